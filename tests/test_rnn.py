"""Quantized LSTM / GRU / RNN and their cells: torch's semantics, int8 accuracy, files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lowbit
from lowbit.config import Recipe
from lowbit.nn import QGRU, QLSTM, QLinear, QLSTMCell, QParent
from lowbit.spec import QuantSpec

HIGH = Recipe.from_dict(
    {
        "name": "w16a16-dynamic",
        "default": {
            "weight": {"dtype": "int16", "granularity": "per_channel"},
            "input": {"dtype": "int16", "dynamic": True},
        },
    }
)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB (lowbit's own measure)."""
    return float(lowbit.sqnr_db(ref, out))


def flat(result: object) -> list[torch.Tensor]:
    """Every tensor of an RNN's return value, in order (PackedSequence: its data)."""
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, torch.Tensor):
        return [result]
    assert isinstance(result, tuple)
    return [t for item in result for t in flat(item)]


class Seq(nn.Module):
    """Runs one recurrent module on (x, state) and returns its whole output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, hx: object = None) -> object:
        return self.rnn(x, hx)


CASES = {
    "lstm-2layer-bidir": lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True),
    "lstm-batch-first-no-bias": lambda: nn.LSTM(6, 8, batch_first=True, bias=False),
    "lstm-proj": lambda: nn.LSTM(6, 8, num_layers=2, proj_size=4, bidirectional=True),
    "gru-2layer-bidir": lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, batch_first=True),
    "rnn-relu": lambda: nn.RNN(6, 8, nonlinearity="relu", num_layers=2),
}


def _state(rnn: nn.Module, batch: int | None) -> object:
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    lead = (layers, batch) if batch is not None else (layers,)
    h = torch.randn(
        *lead, rnn.proj_size or rnn.hidden_size if isinstance(rnn, nn.LSTM) else rnn.hidden_size
    )
    if isinstance(rnn, nn.LSTM):
        return h, torch.randn(*lead, rnn.hidden_size)
    return h


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_high_bit_twin_matches_float_with_torch_return_structure(
    case: str, batched: bool, with_state: bool
) -> None:
    torch.manual_seed(0)
    rnn = CASES[case]()
    x = torch.randn(3, 5, 6) if batched else torch.randn(5, 6)
    batch = x.shape[0 if rnn.batch_first else 1] if batched else None
    hx = _state(rnn, batch) if with_state else None
    ref = rnn(x, hx)
    q = lowbit.prepare(Seq(rnn), HIGH)
    assert isinstance(q.rnn, QParent) and isinstance(q.rnn, type(rnn))
    got = q(x, hx)
    assert type(got) is type(ref) and type(got[1]) is type(ref[1])
    for a, b in zip(flat(ref), flat(got), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)
    frozen = lowbit.convert(q)
    for a, b in zip(flat(ref), flat(frozen(x, hx)), strict=True):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_packed_sequences_match_float(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    rnn = cls(6, 8, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 5, 6)
    lengths = torch.tensor([3, 5, 1, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    hx = _state(rnn, 4)
    ref = rnn(packed, hx)
    got = lowbit.prepare(Seq(rnn), HIGH)(packed, hx)
    assert isinstance(got[0], PackedSequence)
    assert torch.equal(got[0].batch_sizes, ref[0].batch_sizes)
    for a, b in zip(flat(ref), flat(got), strict=True):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)


class Tagger(nn.Module):
    """Embedding-free sequence model: LSTM -> GRU -> LSTMCell over the last step -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(12, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(64, 24, batch_first=True)
        self.cell = nn.LSTMCell(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, h = self.gru(y)
        h, _ = self.cell(y[:, -1])
        return self.head(h)


def _data(n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 10, 12, generator=gen) for _ in range(n)]


def test_w8a8_makes_the_rnn_dynamic_and_keeps_30db(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Tagger().eval()
    data = _data()
    q = lowbit.quantize(model, "w8a8", data=data)
    layers = lowbit.quantized_layers(q)
    assert {"lstm.ih_l0", "lstm.hh_l1_reverse", "gru.ih_l0", "cell.hh", "head"} <= set(layers)
    assert layers["lstm.ih_l0"].input_quantizer.spec.dynamic  # static spec made dynamic
    notes = lowbit.api.prepared_info(q).notes
    assert any(n.startswith("lstm: activations quantized dynamically (int8") for n in notes)
    assert not layers["head"].input_quantizer.spec.dynamic
    assert isinstance(q.lstm.weight_ih_l0, lowbit.nn.QTensor)  # the float names still read
    x = torch.randn(8, 10, 12)
    with torch.no_grad():
        ref, out = model(x), q(x)
        assert sqnr(ref, out) >= 30
        # the integer kernels agree with the simulation they were frozen from
        sim = lowbit.calibrate(lowbit.prepare(model, "w8a8"), data)(x)
    assert sqnr(sim, out) >= 40


def test_lstm_alone_int8_sqnr_per_output() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
    x = torch.randn(12, 4, 16)
    q = lowbit.quantize(Seq(rnn), "w8a8-dynamic")
    with torch.no_grad():
        for a, b in zip(flat(rnn(x)), flat(q(x)), strict=True):
            assert sqnr(a, b) >= 30


def test_comparable_to_torch_ao_dynamic_lstm() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(32, 64, num_layers=2)
    x = torch.randn(20, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        ao = torch.ao.quantization.quantize_dynamic(Seq(rnn), {nn.LSTM}, dtype=torch.qint8)
    ours = lowbit.quantize(Seq(rnn), "w8a8-dynamic")
    with torch.no_grad():
        ref = rnn(x)[0]
        ours_db, ao_db = sqnr(ref, ours(x)[0]), sqnr(ref, ao(x)[0])
    assert ours_db >= 30
    assert ours_db >= ao_db - 1.0, (ours_db, ao_db)


@pytest.mark.parametrize("recipe, floor", [("w8a16", 35.0), ("w4a16", 15.0)])
def test_weight_only_recipes_keep_activations_float(recipe: str, floor: float) -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(64, 64, batch_first=True)
    q = lowbit.quantize(Seq(rnn), recipe)
    assert q.rnn.ih_l0.input_quantizer is None
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        assert sqnr(rnn(x)[0], q(x)[0]) >= floor


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_match_float_and_keep_30db(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    cell = cls(16, 32)
    x = torch.randn(4, 16)
    hx = torch.randn(4, 32)
    state = (hx, torch.randn(4, 32)) if cls is nn.LSTMCell else hx
    high = lowbit.prepare(Seq(cell), HIGH)
    for a, b in zip(flat(cell(x, state)), flat(high(x, state)), strict=True):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)
    for a, b in zip(flat(cell(x[0])), flat(high(x[0])), strict=True):  # unbatched, no state
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-3)
    q = lowbit.quantize(Seq(cell), "w8a8", data=[torch.randn(4, 16)])
    with torch.no_grad():
        for a, b in zip(flat(cell(x, state)), flat(q(x, state)), strict=True):
            assert sqnr(a, b) >= 30


def test_save_load_round_trip_is_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tagger().eval()
    model.lstm = nn.LSTM(12, 32, num_layers=2, bidirectional=True, batch_first=True, proj_size=8)
    model.gru = nn.GRU(16, 24, batch_first=True)
    q = lowbit.quantize(model, "w8a8", data=_data(2))
    path = lowbit.save(q, tmp_path / "tagger")
    fresh = Tagger()
    fresh.lstm = nn.LSTM(12, 32, num_layers=2, bidirectional=True, batch_first=True, proj_size=8)
    fresh.gru = nn.GRU(16, 24, batch_first=True)
    back = lowbit.load(path, fresh)
    assert isinstance(back.lstm, QLSTM) and isinstance(back.gru, QGRU)
    assert isinstance(back.cell, QLSTMCell) and isinstance(back.lstm.hr_l1_reverse, QLinear)
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert torch.equal(back.lstm.hh_l0.weight.int_repr(), q.lstm.hh_l0.weight.int_repr())


def test_float_state_dict_loads_into_the_prepared_twin() -> None:
    torch.manual_seed(0)
    rnn, other = nn.LSTM(6, 8, num_layers=2), nn.LSTM(6, 8, num_layers=2)
    q = lowbit.prepare(Seq(rnn), HIGH)
    q.rnn.load_state_dict(other.state_dict())
    assert torch.equal(q.rnn.weight_hh_l1, other.weight_hh_l1)
    x = torch.randn(4, 2, 6)
    torch.testing.assert_close(q(x)[0], other(x)[0], atol=2e-4, rtol=1e-3)


def test_bad_inputs_say_what_to_pass() -> None:
    q = QLSTM.from_float(nn.LSTM(6, 8), QuantSpec("int8", "per_channel"), None)
    with pytest.raises(ValueError, match=r"LSTM: Expected input to be 2D or 3D, got 4D"):
        q(torch.randn(1, 2, 3, 6))
    with pytest.raises(RuntimeError, match=r"input_size. Expected 6, got 5"):
        q(torch.randn(3, 2, 5))
    with pytest.raises(RuntimeError, match=r"expected hx\[1\] of shape \[1, 2, 8\]"):
        q(torch.randn(3, 2, 6), (torch.zeros(1, 2, 8), torch.zeros(1, 3, 8)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        q(torch.randn(3, 2, 6), torch.zeros(1, 2, 8))
    cell = lowbit.prepare(Seq(nn.GRUCell(6, 8)), HIGH).rnn
    with pytest.raises(ValueError, match="GRUCell: Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 6))


def test_bfloat16_model_runs_in_bfloat16() -> None:
    torch.manual_seed(0)
    model = Tagger().eval().to(torch.bfloat16)
    q = lowbit.quantize(model, "w8a8", data=[d.bfloat16() for d in _data(2)])
    x = torch.randn(8, 10, 12).bfloat16()
    with torch.no_grad():
        out = q(x)
        assert out.dtype == torch.bfloat16
        assert sqnr(model(x).float(), out.float()) >= 30


def test_prepared_twin_trains_through_its_children() -> None:
    torch.manual_seed(0)
    q = lowbit.prepare(Tagger(), "w8a8-dynamic").train()
    q(torch.randn(2, 5, 12)).sum().backward()
    assert q.lstm.ih_l0.weight.grad is not None and q.lstm.weight_hh_l1.grad is not None
    assert float(q.lstm.ih_l0.weight.grad.abs().sum()) > 0


def test_a_subclass_overriding_forward_stays_float() -> None:
    class Scaled(nn.LSTM):
        def forward(self, x: torch.Tensor, hx: object = None) -> object:
            return super().forward(2 * x, hx)

    q = lowbit.prepare(nn.Sequential(Seq(Scaled(4, 4)), nn.Linear(4, 4)), "w8a16")
    assert type(q[0].rnn) is Scaled
    assert "overrides LSTM.forward()" in lowbit.api.prepared_info(q).kept_float["0.rnn"]


def test_compile_keeps_the_twins_whole_and_fuses_around_them() -> None:
    torch.manual_seed(0)
    q = lowbit.quantize(Tagger().eval(), "w8a8", data=_data(1))
    compiled = lowbit.compile(q)
    x = torch.randn(8, 10, 12)
    with torch.no_grad():
        assert torch.equal(compiled(x), q(x))


def test_converted_rnn_holds_its_weights_as_integers_only() -> None:
    torch.manual_seed(0)
    model = Tagger().eval()
    q = lowbit.quantize(model, "w8a16")
    assert {n.rsplit(".", 1)[-1] for n, _ in q.named_parameters()} == {"bias"}
    assert q.lstm._flat_weights == []  # no list keeping the float matrices alive
    float_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "weight" in n)
    int_bytes = sum(
        w.storage_nbytes() for w in (m.weight for m in lowbit.quantized_layers(q).values())
    )
    assert int_bytes < float_bytes / 3


def test_model_code_calling_flatten_parameters_keeps_working() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 8, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rnn.flatten_parameters()  # common in user code (a no-op off cuDNN)
            return self.rnn(x)[0]

    torch.manual_seed(0)
    model = Encoder().eval()
    q = lowbit.quantize(model, "w8a8-dynamic")
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 30
    assert [type(w).__name__ for w in q.rnn.all_weights[0]] == ["QTensor", "QTensor"] + [
        "Parameter"
    ] * 2
