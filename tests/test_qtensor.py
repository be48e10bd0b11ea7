"""QTensor, the frozen weight: integers, scale and zero point that read as the float tensor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.nn import QTensor
from lowbit.nn.state import read_bias, read_weight, write_qtensor
from lowbit.primitives import storage_dtype
from lowbit.spec import QuantSpec

SPECS = {
    "int8-channel": QuantSpec("int8", "per_channel"),
    "int8-narrow": QuantSpec("int8", "per_channel", narrow_range=True),
    "uint8-tensor": QuantSpec("uint8", "per_tensor", symmetric=False),
    "int4-group": QuantSpec("int4", "per_group:8", symmetric=False),
    "int4-channel-sym": QuantSpec("int4", "per_channel"),
    "int2-group": QuantSpec("int2", "per_group:4", symmetric=False),
    "int16": QuantSpec("int16", "per_tensor"),
}


def _weight(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(6, 20)


@pytest.mark.parametrize("name", list(SPECS))
def test_reads_as_the_float_tensor_and_stores_integers(name: str) -> None:
    spec = SPECS[name]
    w = _weight()
    qt = QTensor.quantize(w, spec)
    assert qt.shape == w.shape and qt.dtype == w.dtype and qt.device == w.device
    assert not qt.requires_grad
    ints = qt.int_repr()
    assert ints.shape == w.shape and ints.dtype == storage_dtype(spec.qdtype)
    assert spec.qdtype.qmin <= int(ints.min()) and int(ints.max()) <= spec.qdtype.qmax
    if spec.qdtype.bits < 8:
        assert qt.layout_name == "packed"
        assert qt.qdata.numel() == -(-w.numel() * spec.qdtype.storage_bits // 8)
    # the dequantized tensor is within half a step of the float weight, block by block
    step = qt.scale.max().item()
    assert (qt.dequantize() - w).abs().max().item() <= step * (0.5 + 1e-4) or spec.qdtype.bits < 4


def test_any_torch_op_sees_the_dequantized_tensor() -> None:
    qt = QTensor.quantize(_weight(), SPECS["int4-group"])
    x = torch.randn(3, 20)
    dense = qt.dequantize()
    torch.testing.assert_close(F.linear(x, qt), F.linear(x, dense))
    torch.testing.assert_close(qt.t() @ torch.ones(6), dense.t() @ torch.ones(6))
    torch.testing.assert_close(qt * 2, dense * 2)
    assert type(qt + 0) is torch.Tensor  # results are plain tensors


def test_to_dtype_changes_what_it_reads_as_not_the_integers() -> None:
    qt = QTensor.quantize(_weight(), SPECS["int8-channel"])
    half = qt.to(torch.bfloat16)
    assert isinstance(half, QTensor) and half.dtype == torch.bfloat16
    assert torch.equal(half.qdata, qt.qdata) and torch.equal(half.scale, qt.scale)
    assert half.dequantize().dtype == torch.bfloat16
    with pytest.raises(TypeError, match="int_repr"):
        qt.to(torch.int32)


def test_deepcopy_and_clone_are_independent() -> None:
    qt = QTensor.quantize(_weight(), SPECS["int8-channel"])
    for other in (copy.deepcopy(qt), qt.clone()):
        assert isinstance(other, QTensor)
        assert torch.equal(other.int_repr(), qt.int_repr())
        assert other.qdata.data_ptr() != qt.qdata.data_ptr()


def test_writing_float_values_into_it_is_refused() -> None:
    qt = QTensor.quantize(_weight(), SPECS["int8-channel"])
    with pytest.raises(RuntimeError, match="frozen quantized weight"):
        qt.copy_(torch.zeros(6, 20))


def test_int32_bias_is_rounded_at_its_scale() -> None:
    bias = torch.tensor([0.26, -1.0, 3.0])
    scale = torch.tensor([0.1, 0.2, 0.5])
    qb = QTensor.bias(bias, scale)
    assert qb.qdata.tolist() == [3, -5, 6]
    torch.testing.assert_close(qb.dequantize(), torch.tensor([0.3, -1.0, 3.0]))
    assert qb.shape == bias.shape and qb.dtype == bias.dtype


@pytest.mark.parametrize("name", list(SPECS))
def test_state_round_trip_is_exact(name: str) -> None:
    spec = SPECS[name]
    qt = QTensor.quantize(_weight(), spec)
    state = write_qtensor(qt, "w.")
    symmetric_signed = spec.symmetric and spec.qdtype.signed
    assert ("w.zero_point" in state) is not symmetric_signed
    back = read_weight(dict(state), "w.", spec, qt.shape, qt.dtype)
    assert torch.equal(back.int_repr(), qt.int_repr())
    assert torch.equal(back.scale, qt.scale) and torch.equal(back.zero_point, qt.zero_point)
    bias = QTensor.bias(torch.randn(6), qt.scale.reshape(-1)[:1].expand(6).clone())
    assert torch.equal(read_bias(write_qtensor(bias, "b."), "b.", (6,), qt.dtype).qdata, bias.qdata)


def test_damaged_state_is_refused_naming_the_tensor() -> None:
    spec = SPECS["int4-group"]
    qt = QTensor.quantize(_weight(), spec)

    def read(**changes: torch.Tensor) -> None:
        state = write_qtensor(qt, "w.")
        state.update({f"w.{k}": v for k, v in changes.items()})
        read_weight(state, "w.", spec, qt.shape, qt.dtype)

    with pytest.raises(ValueError, match="'w.qdata'.*bytes cannot hold"):
        read(qdata=qt.qdata[:-1])
    with pytest.raises(ValueError, match="'w.scale' holds a scale that is not a finite positive"):
        read(scale=torch.full_like(qt.scale, float("nan")))
    with pytest.raises(ValueError, match="'w.scale' is .*expected float32"):
        read(scale=qt.scale[:2])
    int8 = SPECS["int8-channel"]
    q8 = QTensor.quantize(_weight(), int8)
    state = write_qtensor(q8, "w.")
    state["w.qdata"] = torch.full((6, 20), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside the int8 range"):
        read_weight(
            state, "w.", QuantSpec("int8", "per_channel", narrow_range=True), (6, 20), torch.float32
        )
    state = write_qtensor(QTensor.quantize(_weight(), SPECS["uint8-tensor"]), "w.")
    del state["w.zero_point"]
    with pytest.raises(ValueError, match="missing key 'w.zero_point'"):
        read_weight(state, "w.", SPECS["uint8-tensor"], (6, 20), torch.float32)
