"""Quantized layers: from_float, observe -> fake-quant -> freeze, integer bias, errors, registry.

Quality is measured in dB (SQNR) against the float layer or the fake-quant layer, parametrised
over layer kinds and specs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QConv1d, QConv2d, QLinear, QModule, QTensor, qmodule_class
from lowbit.primitives import storage_dtype
from lowbit.report.metrics import sqnr_db
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec, SpecError

# name -> (float layer factory, input shape, expected quantized class)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], type[QModule]]] = {
    "linear": (lambda: nn.Linear(32, 16), (8, 32), QLinear),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=1), (4, 4, 20), QConv1d),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 10, 10), QConv2d),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 8, 3, groups=2), (2, 4, 10, 10), QConv2d),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 10, 10), QConv2d),
}

W8_CHANNEL = QuantSpec("int8", "per_channel")
A8_STATIC = QuantSpec("uint8", "per_tensor", symmetric=False)

# weight spec -> whether freeze() may turn the bias into int32 (with a static per-tensor input)
WEIGHT_SPECS = {
    "int8-tensor-sym": (QuantSpec("int8", "per_tensor"), True),
    "int8-channel-sym": (W8_CHANNEL, True),
    "int4-channel-asym": (QuantSpec("int4", "per_channel", symmetric=False), True),
    "uint8-tensor-asym": (QuantSpec("uint8", "per_tensor", symmetric=False), True),
    "int2-channel-mse": (QuantSpec("int2", "per_channel", observer="mse"), True),
    "int4-group8": (QuantSpec("int4", "per_group:8", symmetric=False), False),
}


def _layer(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, type[QModule]]:
    """A float layer with a non-trivial bias, an input batch and the expected quantized class."""
    factory, shape, qcls = LAYERS[name]
    torch.manual_seed(seed)
    layer = factory()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.copy_(torch.randn_like(layer.bias) * 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    return layer, torch.randn(shape, generator=gen), qcls


def _calibrated(
    layer: nn.Module, qcls: type[QModule], x: torch.Tensor, weight: QuantSpec, inp: QuantSpec
) -> QModule:
    q = qcls.from_float(layer, weight, inp, name="layer")
    with torch.no_grad():
        q(x)
        q(x * 0.5)
    assert q.input_quantizer is not None
    q.input_quantizer.finish_observing()
    return q


# ---------------------------------------------------------------------------- from_float


@pytest.mark.parametrize("name", list(LAYERS))
def test_from_float_shares_parameters_and_stays_close(name: str) -> None:
    layer, x, qcls = _layer(name)
    layer.eval()
    q = qcls.from_float(layer, W8_CHANNEL, None, name=name)
    assert type(q) is qcls
    assert q.weight is layer.weight
    assert q.bias is layer.bias
    assert q.training == layer.training
    if isinstance(layer, nn.modules.conv._ConvNd):
        assert isinstance(q, nn.modules.conv._ConvNd)
        assert (q.groups, q.stride, q.padding) == (layer.groups, layer.stride, layer.padding)
    with torch.no_grad():
        ref, out = layer(x), q(x)
    assert out.shape == ref.shape
    assert sqnr_db(ref, out) > 35.0


def test_from_float_without_bias() -> None:
    layer = nn.Conv2d(3, 4, 3, bias=False)
    x = torch.randn(1, 3, 8, 8)
    q = _calibrated(layer, QConv2d, x, W8_CHANNEL, A8_STATIC)
    q.freeze()
    assert q.bias is None and getattr(q, "qbias", None) is None
    assert sqnr_db(layer(x), q(x)) > 30.0


# ---------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("wname", list(WEIGHT_SPECS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_freeze_matches_fake_quant(name: str, wname: str) -> None:
    layer, x, qcls = _layer(name)
    wspec, int_bias = WEIGHT_SPECS[wname]
    q = _calibrated(layer, qcls, x, wspec, A8_STATIC)
    with torch.no_grad():
        fake = q(x)
    # measured minimum over these layers: 41.9 dB (8-bit), 25.1 (int4), 11.0 (int2)
    floor = {8: 38.0, 4: 22.0, 2: 8.0}[wspec.qdtype.bits]
    assert sqnr_db(layer(x).detach(), fake) > floor
    wq, iq = q.weight_quantizer, q.input_quantizer
    assert wq is not None and iq is not None and wq.scale is not None and iq.scale is not None
    bias_scale = (wq.scale * iq.scale).reshape(-1)
    float_bias = layer.bias.detach().clone()

    q.freeze()
    q.set_kernel("reference")  # the simulation; integer kernels are tested in tests/runtime
    with torch.no_grad():
        frozen = q(x)

    assert q.frozen
    assert "weight" not in dict(q.named_parameters())
    assert isinstance(q.weight, QTensor) and q.weight.shape == layer.weight.shape
    assert q.weight.dtype == layer.weight.dtype
    ints = q.weight.int_repr()
    assert ints.dtype == storage_dtype(wspec.qdtype)
    assert wspec.qdtype.qmin <= int(ints.min()) <= int(ints.max()) <= wspec.qdtype.qmax
    if int_bias:
        assert isinstance(q.bias, QTensor) and q.bias.qdata.dtype == torch.int32
        assert torch.equal(q.bias.qdata, torch.round(float_bias / bias_scale).to(torch.int32))
        # the outputs differ by exactly the int32 bias rounding, channel by channel
        rounding = q.bias.qdata.float() * bias_scale - float_bias  # (out,)
        channel_shape = (-1,) if isinstance(q, nn.Linear) else (-1, *[1] * (x.ndim - 2))
        torch.testing.assert_close(frozen - fake, rounding.view(channel_shape).expand_as(fake))
        assert rounding.abs().max() <= 0.5 * bias_scale.max() * (1 + 1e-5)
        if wspec.qdtype.bits >= 4:
            assert sqnr_db(fake, frozen) > 60.0
    else:
        assert not isinstance(q.bias, QTensor)
        assert q.bias is not None and torch.equal(q.bias.detach(), float_bias)
        assert sqnr_db(fake, frozen) > 100.0  # identical up to float rounding


@pytest.mark.parametrize(
    "inp",
    [
        QuantSpec("int8", "per_tensor", symmetric=False, dynamic=True),
        QuantSpec("int8", PerChannel(1), symmetric=False),
    ],
    ids=["dynamic", "per_channel_input"],
)
def test_bias_stays_float_unless_input_is_static_per_tensor(inp: QuantSpec) -> None:
    layer, x, qcls = _layer("conv2d")
    q = qcls.from_float(layer, W8_CHANNEL, inp, name="conv")
    with torch.no_grad():
        q(x)
    assert q.input_quantizer is not None
    q.input_quantizer.finish_observing()
    with torch.no_grad():
        fake = q(x)
    q.freeze()
    q.set_kernel("reference")
    assert not isinstance(q.bias, QTensor)
    assert q.bias is layer.bias
    with torch.no_grad():
        assert sqnr_db(fake, q(x)) > 100.0


def test_freeze_is_idempotent() -> None:
    layer, x, qcls = _layer("linear")
    q = _calibrated(layer, qcls, x, W8_CHANNEL, A8_STATIC)
    q.freeze()
    weight, bias = q.weight, q.bias
    q.freeze()
    assert q.weight is weight and q.bias is bias


def test_freeze_before_calibration_raises() -> None:
    layer, x, qcls = _layer("linear")
    q = qcls.from_float(layer, W8_CHANNEL, A8_STATIC, name="fc")
    q(x)  # observed, but finish_observing (calibration) never ran
    with pytest.raises(RuntimeError, match="calibrat"):
        q.freeze()
    assert not q.frozen and q.weight is layer.weight


def test_weight_only_freezes_without_calibration() -> None:
    layer, x, qcls = _layer("conv1d")
    q = qcls.from_float(layer, QuantSpec("int4", "per_channel"), None, name="conv")
    with torch.no_grad():
        fake = q(x)
    q.freeze()
    q.set_kernel("reference")
    with torch.no_grad():
        assert sqnr_db(fake, q(x)) > 100.0
    assert q.bias is layer.bias  # no input scale, so no integer bias


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", list(LAYERS))
def test_nan_weight_raises_naming_the_layer(name: str) -> None:
    layer, _, qcls = _layer(name)
    with torch.no_grad():
        layer.weight.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=r"encoder\.block3.*NaN"):
        qcls.from_float(layer, W8_CHANNEL, None, name="encoder.block3")


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_per_group_input_raises(name: str) -> None:
    layer, _, qcls = _layer(name)
    with pytest.raises(SpecError, match="per_group"):
        qcls.from_float(layer, W8_CHANNEL, QuantSpec("int8", PerGroup(8)), name=name)


@pytest.mark.parametrize(("name", "axis"), [("linear", 2), ("linear", -3), ("conv2d", 4)])
def test_per_channel_axis_out_of_range_raises(name: str, axis: int) -> None:
    layer, _, qcls = _layer(name)
    with pytest.raises(SpecError, match=rf"axis={axis}"):
        qcls.from_float(layer, QuantSpec("int8", PerChannel(axis)), None, name=name)


def test_dynamic_weight_raises() -> None:
    layer, _, qcls = _layer("linear")
    with pytest.raises(SpecError, match="dynamic"):
        qcls.from_float(layer, QuantSpec("int8", dynamic=True), None, name="fc")


# ---------------------------------------------------------------------------- registry


class MyLinear(nn.Linear):
    """A user's subclass: dispatch goes by type, so it maps like nn.Linear."""


class MyConv(nn.Conv2d):
    pass


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(2, 2), QLinear),
        (MyLinear(2, 2), QLinear),
        (nn.Conv1d(1, 1, 1), QConv1d),
        (nn.Conv2d(1, 1, 1), QConv2d),
        (MyConv(1, 1, 1), QConv2d),
        (QLinear.from_float(nn.Linear(2, 2), W8_CHANNEL), None),
        (nn.ReLU(), None),
        (nn.BatchNorm2d(2), None),
        (nn.Sequential(nn.Linear(2, 2)), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_registry(module: nn.Module, expected: type[QModule] | None) -> None:
    assert qmodule_class(module) is expected


# ---------------------------------------------------------------------------- training / dynamic


@pytest.mark.parametrize("name", ["linear", "conv2d_groups2"])
def test_gradients_flow_through_fake_quant_weights(name: str) -> None:
    layer, x, qcls = _layer(name)
    q = _calibrated(layer, qcls, x, QuantSpec("int4", "per_channel"), A8_STATIC)
    q.train()
    x = x.clone().requires_grad_(True)
    q(x).pow(2).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert layer.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0

    # STE: the float weight gets exactly the gradient taken at the fake-quantized weight
    wq = q.quantized_weight().detach().requires_grad_(True)
    xq = q.input_quantizer(x.detach()) if q.input_quantizer is not None else x.detach()
    q.float_forward(xq, wq, layer.bias.detach()).pow(2).sum().backward()
    assert wq.grad is not None
    torch.testing.assert_close(layer.weight.grad, wq.grad)


def test_dynamic_input_recomputes_scale_per_batch() -> None:
    layer, _, qcls = _layer("linear")
    dyn = QuantSpec("int8", "per_tensor", symmetric=False, dynamic=True)
    q = qcls.from_float(layer, W8_CHANNEL, dyn, name="fc")
    iq = q.input_quantizer
    assert iq is not None and not iq.observing and iq.observer is None
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(8, 32, generator=gen) * 0.01
    large = torch.randn(8, 32, generator=gen) * 100.0
    s_small, _ = iq.qparams_for(small)
    s_large, _ = iq.qparams_for(large)
    assert float(s_large / s_small) > 1000.0
    # one fixed scale could not serve both: each batch is quantized on its own range
    for x in (small, large):
        assert sqnr_db(x, iq(x)) > 35.0
        with torch.no_grad():
            assert sqnr_db(layer(x), q(x)) > 30.0
    assert iq.scale is None  # nothing stored between batches
    q.freeze()
    with torch.no_grad():
        assert sqnr_db(layer(small), q(small)) > 30.0


def test_static_input_keeps_its_scale() -> None:
    layer, x, qcls = _layer("linear")
    q = _calibrated(layer, qcls, x, W8_CHANNEL, A8_STATIC)
    assert q.input_quantizer is not None and q.input_quantizer.scale is not None
    scale = q.input_quantizer.scale.clone()
    with torch.no_grad():
        q(x * 100.0)
    assert torch.equal(q.input_quantizer.scale, scale)


def test_quantized_linear_matches_functional() -> None:
    """Unfrozen fake-quant forward is F.linear on the fake-quantized weight and input."""
    layer, x, qcls = _layer("linear")
    q = _calibrated(layer, qcls, x, QuantSpec("int8", PerTensor()), A8_STATIC)
    assert q.input_quantizer is not None
    with torch.no_grad():
        expected = F.linear(q.input_quantizer(x), q.quantized_weight(), layer.bias)
        torch.testing.assert_close(q(x), expected)


@pytest.mark.parametrize(
    ("layer", "bad_shape", "words"),
    [
        (nn.Linear(8, 4), (2, 5), ["fc", "8 features", "(2, 5)"]),
        (nn.Conv2d(3, 4, 3), (2, 5, 8, 8), ["fc", "C=3", "H, W", "(2, 5, 8, 8)"]),
        (nn.Conv2d(3, 4, 3), (8, 8), ["fc", "C=3", "(8, 8)"]),
        (nn.Conv1d(2, 4, 3), (1, 3, 9), ["fc", "C=2", "W)", "(1, 3, 9)"]),
    ],
)
def test_wrong_input_shape_names_the_layer_and_the_shape(
    layer: nn.Module, bad_shape: tuple[int, ...], words: list[str]
) -> None:
    qcls = qmodule_class(layer)
    assert qcls is not None
    q = qcls.from_float(layer, W8_CHANNEL, QuantSpec("int8", dynamic=True), name="fc")
    with pytest.raises(ValueError) as err:
        q(torch.randn(bad_shape))
    for word in words:
        assert word in str(err.value)


def test_unbatched_conv_input_still_works() -> None:
    q = QConv2d.from_float(nn.Conv2d(3, 4, 3), W8_CHANNEL)
    assert q(torch.randn(3, 8, 8)).shape == (4, 6, 6)
    assert q.label == "Conv2d"  # from_float without a name: the float class names it
