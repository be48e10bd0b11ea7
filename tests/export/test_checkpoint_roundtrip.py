"""save -> load round trips: identical outputs and state for every shipped recipe."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from checkpoint_models import Net, batch, fresh_net, quantized_net
from safetensors import safe_open
from torch import nn

from lowbit.api import prepared_info, quantize, quantized_layers
from lowbit.config import QuantConfig, Recipe, Rule
from lowbit.export import load, read_header, save, theoretical_size
from lowbit.nn import QTensor
from lowbit.spec import QuantSpec

RECIPES = ["w8a8", "w8a8-dynamic", "w8a8-pertensor", "w4a8", "w4a16", "w8a16", "w2a8"]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _assert_same_frozen_layers(a: nn.Module, b: nn.Module) -> None:
    la, lb = quantized_layers(a), quantized_layers(b)
    assert list(la) == list(lb)
    for name, qa in la.items():
        qb = lb[name]
        assert type(qa) is type(qb) and qa.frozen == qb.frozen, name
        assert ("weight" in dict(qa.named_parameters(recurse=False))) == (
            "weight" in dict(qb.named_parameters(recurse=False))
        ), name
        assert (qa.bias is None) == (qb.bias is None), name
        for qname in ("weight_quantizer", "input_quantizer"):
            qqa, qqb = getattr(qa, qname), getattr(qb, qname)
            assert (qqa is None) == (qqb is None)
            if qqa is not None:
                assert qqa.spec == qqb.spec and qqa.observing == qqb.observing is False
                if qa.frozen:
                    assert qqb.observer is None


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_is_identical(recipe: str, tmp_path: Path) -> None:
    q = quantized_net(recipe)
    path = save(q, tmp_path / f"{recipe}.lowbit")
    fresh = fresh_net()
    assert not torch.equal(fresh.stem.weight, warm_stem_weight())  # really different weights
    back = load(path, fresh).eval()
    for seed in (1, 2):
        x = batch(seed)
        assert torch.equal(back(x), q(x))
    _assert_same_state(q, back)
    _assert_same_frozen_layers(q, back)
    info, back_info = prepared_info(q), prepared_info(back)
    assert back_info.recipe == info.recipe
    assert back_info.folds == info.folds and len(info.folds) == 3  # stem_bn, block.bn, bn_dw
    assert isinstance(back.stem_bn, nn.Identity) and isinstance(back.block.bn_dw, nn.Identity)


def warm_stem_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return Net().stem.weight.detach()


def test_depthwise_and_int_bias_survive(tmp_path: Path) -> None:
    q = quantized_net("w8a8")
    back = load(save(q, tmp_path / "m.lowbit"), fresh_net())
    dw = back.block.dw
    assert dw.groups == 8 and tuple(dw.weight.int_repr().shape) == (8, 1, 3, 3)
    assert isinstance(dw.bias, QTensor) and dw.bias.qdata.dtype == torch.int32
    assert torch.equal(dw.bias.qdata, q.block.dw.bias.qdata)


def test_mixed_recipe_with_float_layers(tmp_path: Path) -> None:
    int8 = QuantSpec("int8", "per_channel")
    recipe = Recipe(
        QuantConfig(weight=int8, input=QuantSpec("uint8", symmetric=False)),
        rules=(
            Rule("head", None),
            Rule("fc1", QuantConfig(weight=QuantSpec("int4", "per_group:4", symmetric=False))),
            Rule("block.conv", QuantConfig(input=QuantSpec("int8"))),  # input only: float weight
        ),
        name="mixed",
    )
    q = quantized_net(recipe)
    back = load(save(q, tmp_path / "mixed.lowbit"), fresh_net()).eval()
    x = batch(3)
    assert torch.equal(back(x), q(x))
    assert isinstance(back.head, nn.Linear) and type(back.head) is nn.Linear
    _assert_same_state(q, back)
    assert prepared_info(back).recipe == recipe


def test_loaded_model_saves_to_identical_bytes(tmp_path: Path) -> None:
    q = quantized_net("w4a8")
    first = save(q, tmp_path / "a.lowbit")
    second = save(load(first, fresh_net()), tmp_path / "b.lowbit")
    assert first.read_bytes() == second.read_bytes()


def test_user_model_is_not_modified_by_load(tmp_path: Path) -> None:
    path = save(quantized_net("w8a8"), tmp_path / "m.lowbit")
    fresh = fresh_net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    text = repr(fresh)
    load(path, fresh)
    assert repr(fresh) == text
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not hasattr(fresh, "_lowbit_info")


class BigNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)
        )


def test_w4a16_file_size_is_the_packed_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    q = quantize(BigNet(), "w4a16")
    path = save(q, tmp_path / "big.lowbit")
    size = path.stat().st_size
    theory = theoretical_size(q)
    fp32 = sum(p.numel() for p in BigNet().parameters()) * 4
    assert abs(size - theory) / theory < 0.03, (size, theory)
    assert size < fp32 / 5, (size, fp32)
    # by hand: int4 weights, per-group-32 fp32 scales and int4 zero points, fp32 bias
    groups = 512 * (512 // 32)
    by_hand = 3 * (512 * 512 // 2 + 4 * groups + groups // 2 + 4 * 512)
    assert theory == by_hand
    back = load(path, BigNet())
    x = torch.randn(4, 512)
    assert torch.equal(back(x), q(x))


@pytest.mark.parametrize(
    ("recipe", "dtype", "shape"),
    [
        ("w4a16", "U8", (512 * 512 // 2,)),
        ("w2a8", "U8", (512 * 512 // 4,)),
        ("w8a16", "I8", (512, 512)),
    ],
)
def test_weights_are_packed_at_their_width(
    recipe: str, dtype: str, shape: tuple[int, ...], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    q = quantize(BigNet(), recipe, data=[torch.randn(16, 512)])
    path = save(q, tmp_path / "big.lowbit")
    header = read_header(path)
    entry = header.tensors["0.weight.qdata"]
    assert entry.dtype == dtype and entry.shape == shape
    assert entry.nbytes == math.prod(shape)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("0.weight.qdata").numel() == math.prod(shape)


@pytest.mark.parametrize(("recipe", "stored"), [("w8a16", None), ("w4a16", 4), ("w2a8", 2)])
def test_weight_zero_points_cost_their_bits_only(
    recipe: str, stored: int | None, tmp_path: Path
) -> None:
    """Symmetric zero points are all zero and left out; asymmetric ones are packed at the
    weight's width, not stored as int32."""
    torch.manual_seed(0)
    q = quantize(BigNet(), recipe, data=[torch.randn(16, 512)])
    header = read_header(save(q, tmp_path / "big.lowbit"))
    key = "0.weight.zero_point"
    if stored is None:
        assert key not in header.tensors
        assert not q[0].weight.zero_point.any()
    else:
        groups = q[0].weight.zero_point.numel()
        assert header.tensors[key].dtype == "U8"
        assert header.tensors[key].nbytes == math.ceil(groups * stored / 8)


def test_file_is_safetensors_not_pickle(saved_w8a8: tuple[nn.Module, Path]) -> None:
    _, path = saved_w8a8
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert 8 + n < len(data) and data[8:9] == b"{"
    assert not data.startswith(b"PK") and data[:1] != b"\x80"


def test_load_never_unpickles(
    saved_w8a8: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle or torch.load was called")

    for target, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(target, name, refuse)
    q, path = saved_w8a8
    back = load(path, fresh_net())
    x = batch(9)
    assert torch.equal(back(x), q(x))


def test_suffix_is_added(tmp_path: Path) -> None:
    path = save(quantized_net("w8a16"), tmp_path / "model")
    assert path == tmp_path / "model.lowbit" and path.is_file()
