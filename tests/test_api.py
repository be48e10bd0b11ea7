"""The life cycle on users' own models: prepare / calibrate / convert / quantize.

The models here are written in the test, not taken from any zoo, to show that lowbit works on a
model it has never seen, with no change to the model's code.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.api import calibrate, convert, prepare, prepared_info, quantize, quantized_layers
from lowbit.config import Rule, load_recipe
from lowbit.nn import QModule, QTensor
from lowbit.report.metrics import sqnr_db

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _batches(
    shape: tuple[int, ...], n: int, seed: int = 0, shift: float = 0.0
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) + shift for _ in range(n)]


def _warm_up_bn(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Random affine BN parameters and non-trivial running statistics; leaves the model in eval."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
        model.train()
        for _ in range(3):
            model(torch.randn(shape, generator=gen) * 2.0 + 0.5)
    model.eval()


class UserNet(nn.Module):
    """Conv-BN-ReLU stem, a residual block with an add, depthwise conv + BN, pointwise conv,
    global pooling and a Linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.stem_act = nn.ReLU()
        self.res_conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.res_bn1 = nn.BatchNorm2d(16)
        self.res_conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.res_bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem_bn(self.stem_conv(x)))
        y = F.relu(self.res_bn1(self.res_conv1(x)))
        y = self.res_bn2(self.res_conv2(y))
        x = F.relu(x + y)
        x = F.relu(self.dw_bn(self.dw(x)))
        x = F.relu(self.pw(x))
        return self.head(torch.flatten(self.pool(x), 1))  # (N, 32) -> (N, classes)


@pytest.fixture(scope="module")
def user_net() -> UserNet:
    torch.manual_seed(0)
    model = UserNet()
    _warm_up_bn(model, (8, 3, 8, 8))
    return model


@pytest.fixture(scope="module")
def calibrated_net(user_net: UserNet) -> nn.Module:
    return calibrate(prepare(user_net, "w8a8"), _batches((8, 3, 8, 8), 2))


@pytest.fixture(scope="module")
def converted_net(calibrated_net: nn.Module) -> nn.Module:
    return convert(calibrated_net)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- (1) user model


def test_user_model_quantizes_unchanged(user_net: UserNet) -> None:
    calib = _batches((8, 3, 8, 8), 4)
    test = _batches((16, 3, 8, 8), 1, seed=1)[0]
    q = quantize(user_net, "w8a8", data=calib)

    assert type(q) is UserNet
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())
    info = prepared_info(q)
    assert {(p.layer, p.bn) for p in info.folds} == {
        ("stem_conv", "stem_bn"),
        ("res_conv1", "res_bn1"),
        ("res_conv2", "res_bn2"),
        ("dw", "dw_bn"),
    }
    layers = quantized_layers(q)
    assert set(layers) == {"stem_conv", "res_conv1", "res_conv2", "dw", "pw", "head"}
    assert all(layer.frozen for layer in layers.values())
    with torch.no_grad():
        db = sqnr_db(user_net(test), q(test))
    assert db > 25.0, f"{db:.1f} dB"


# ---------------------------------------------------------------------------- (2) untraceable


class Untraceable(nn.Module):
    """torch.fx cannot trace this: a shape assert and a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv1d(8, 8, 1)
        self.pos = nn.Linear(8, 4)
        self.neg = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "expects RGB input"
        h = self.features(x).flatten(2)  # (N, 8, H*W)
        h = self.mix(h).mean(dim=2)  # (N, 8)
        if x.sum() > 0:
            return self.pos(h)
        return self.neg(h)


def test_untraceable_model_still_quantizes() -> None:
    torch.manual_seed(0)
    model = Untraceable()
    _warm_up_bn(model, (4, 3, 8, 8))
    # both branches must see calibration data: half the batches sum > 0, half < 0
    calib = _batches((4, 3, 8, 8), 2, shift=1.0) + _batches((4, 3, 8, 8), 2, seed=1, shift=-1.0)
    q = quantize(model, "w8a8", data=calib)

    notes = prepared_info(q).notes
    assert any("could not trace" in note for note in notes), notes
    for name, module in q.named_modules():
        if isinstance(module, QUANTIZABLE):
            assert isinstance(module, QModule), f"{name} was not quantized"
    assert set(quantized_layers(q)) == {"features.0", "mix", "pos", "neg"}
    # the Sequential fallback still folds the batch norm that follows a conv
    assert isinstance(q.features[1], nn.Identity)
    for x in (calib[0], calib[-1]):
        with torch.no_grad():
            assert sqnr_db(model(x), q(x)) > 25.0


# ---------------------------------------------------------------------------- (3) batches


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fc(pixels)
        return out if scale is None else out * scale


def _input_scale(model: nn.Module) -> torch.Tensor:
    quantizer = quantized_layers(model)["fc"].input_quantizer
    assert quantizer is not None and quantizer.scale is not None
    return quantizer.scale


def test_calibrate_accepts_tensors_dicts_and_tuples() -> None:
    torch.manual_seed(0)
    model = KeywordNet()
    xs = _batches((5, 6), 3)
    labels = [torch.zeros(5, dtype=torch.long) for _ in xs]
    as_tensors = calibrate(prepare(model, "w8a8"), xs)
    expected = _input_scale(as_tensors)
    batch_kinds = {
        "dict": [{"pixels": x, "scale": torch.tensor(2.0)} for x in xs],
        "tuple": list(zip(xs, labels, strict=True)),
        "list": [[x, y] for x, y in zip(xs, labels, strict=True)],
        "generator": (x for x in xs),
    }
    for kind, data in batch_kinds.items():
        calibrated = calibrate(prepare(model, "w8a8"), data)
        observer = quantized_layers(calibrated)["fc"].input_quantizer.observer
        assert observer is not None and observer.batches == len(xs), kind
        torch.testing.assert_close(_input_scale(calibrated), expected, msg=kind)


def test_calibrate_num_batches_limits_the_data() -> None:
    prepared = prepare(KeywordNet(), "w8a8")
    calibrate(prepared, _batches((5, 6), 5), num_batches=2)
    observer = quantized_layers(prepared)["fc"].input_quantizer.observer
    assert observer is not None and observer.batches == 2


@pytest.mark.parametrize("bad", ["pixels", 3, None, (), object()], ids=repr)
def test_bad_batch_type_says_what_to_pass(bad: object) -> None:
    prepared = prepare(KeywordNet(), "w8a8")
    with pytest.raises(TypeError, match=r"tensors.*dicts.*tuples"):
        calibrate(prepared, [bad])


def test_static_recipe_without_data_raises() -> None:
    with pytest.raises(ValueError, match="calibration data"):
        quantize(KeywordNet(), "w8a8")
    with pytest.raises(ValueError, match="calibration data"):
        calibrate(prepare(KeywordNet(), "w4a8"), None)


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16", "w8a8-dynamic"])
def test_weight_only_and_dynamic_recipes_need_no_data(recipe: str, user_net: UserNet) -> None:
    q = quantize(user_net, recipe)
    assert all(layer.frozen for layer in quantized_layers(q).values())
    x = _batches((4, 3, 8, 8), 1, seed=2)[0]
    with torch.no_grad():
        assert sqnr_db(user_net(x), q(x)) > 20.0


# ---------------------------------------------------------------------------- (4) no mutation


def test_prepare_and_quantize_leave_the_users_model_alone(user_net: UserNet) -> None:
    before = _state(user_net)
    types = [type(m) for m in user_net.modules()]
    prepared = prepare(user_net, "w8a8")
    assert prepared is not user_net and type(prepared) is UserNet
    calibrate(prepared, _batches((4, 3, 8, 8), 1))
    convert(prepared, inplace=True)
    quantize(user_net, "w8a16")

    assert [type(m) for m in user_net.modules()] == types
    after = _state(user_net)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not hasattr(user_net, "_lowbit_info")
    # no storage is shared either: training the prepared copy cannot reach the user's model
    user_ptrs = {p.data_ptr() for p in user_net.parameters()}
    assert not user_ptrs & {p.data_ptr() for p in prepared.parameters()}


def test_prepare_inplace_edits_the_model() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert prepare(model, "w8a16", inplace=True) is model
    assert isinstance(model[0], QModule)


# ---------------------------------------------------------------------------- (5) (6) errors


def test_model_without_supported_layers_raises() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"Sequential.*supported:.*Conv1d.*Conv2d.*Linear"):
        prepare(model, "w8a8")


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_layer_never_reached_raises_and_suggests_a_null_rule() -> None:
    data = _batches((2, 4), 2)
    with pytest.raises(RuntimeError, match=r"'unused_proj'.*config: null"):
        quantize(WithUnusedLayer(), "w8a8", data=data)
    # following the advice works
    recipe = dataclasses.replace(load_recipe("w8a8"), rules=(Rule("unused_proj", None),))
    q = quantize(WithUnusedLayer(), recipe, data=data)
    assert type(q.unused_proj) is nn.Linear and isinstance(q.fc, QModule)
    # weight-only recipes need no activation ranges, so an unused layer is fine there
    quantize(WithUnusedLayer(), "w8a16")


# ---------------------------------------------------------------------------- (7) modes


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(8, affine=False)  # not after a layer: never folded
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.drop(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_calibrate_keeps_train_eval_modes(mode: str) -> None:
    torch.manual_seed(0)
    prepared = prepare(DropoutNet(), "w8a8")
    prepared.train(mode != "eval")
    if mode == "mixed":
        prepared.norm.eval()  # e.g. a frozen batch norm during fine-tuning
    modes = {name: m.training for name, m in prepared.named_modules()}
    norm_stats = _state(prepared.norm)
    calibrate(prepared, _batches((16, 8), 2))
    after = {name: m.training for name, m in prepared.named_modules()}
    assert after == {n: t for n, t in modes.items() if n in after}
    assert set(modes) - set(after) <= {
        "fc1.weight_quantizer.observer",
        "fc2.weight_quantizer.observer",
    }
    # calibration runs in eval mode: batch-norm statistics are untouched
    for key, value in norm_stats.items():
        assert torch.equal(prepared.norm.state_dict()[key], value), key


def test_calibration_ignores_train_mode_dropout() -> None:
    """Ranges come from eval-mode activations whatever mode the model was left in."""
    torch.manual_seed(0)
    model = DropoutNet()
    data = _batches((16, 8), 2)
    scales = []
    for training in (True, False):
        prepared = prepare(model, "w8a8")
        prepared.train(training)
        calibrate(prepared, data)
        quantizer = prepared.fc2.input_quantizer
        assert quantizer is not None and quantizer.scale is not None
        scales.append(quantizer.scale)
    torch.testing.assert_close(scales[0], scales[1])


# ---------------------------------------------------------------------------- (8) convert


def test_convert_is_idempotent(
    user_net: UserNet, calibrated_net: nn.Module, converted_net: nn.Module
) -> None:
    x = _batches((4, 3, 8, 8), 1, seed=3)[0]
    once = converted_net
    assert once is not calibrated_net
    assert not any(layer.frozen for layer in quantized_layers(calibrated_net).values())
    twice = convert(once)
    in_place = convert(twice, inplace=True)
    assert in_place is twice
    first = _state(once)
    for model in (twice, in_place):
        state = _state(model)
        assert state.keys() == first.keys()
        assert all(torch.equal(state[k], v) for k, v in first.items())
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
        assert sqnr_db(user_net(x), once(x)) > 25.0


def test_converted_layers_hold_integers(converted_net: nn.Module) -> None:
    for name, layer in quantized_layers(converted_net).items():
        assert "weight" not in dict(layer.named_parameters(recurse=False)), name
        assert isinstance(layer.weight, QTensor) and layer.weight.qdata.dtype == torch.int8, name
        # static per-tensor input, per-channel weight: int32 bias at s_w * s_x
        assert isinstance(layer.bias, QTensor) and layer.bias.qdata.dtype == torch.int32, name
        assert layer.weight.shape == layer.weight.int_repr().shape, name


def test_converted_model_can_be_deep_copied(converted_net: nn.Module) -> None:
    """A converted model can itself be copied (e.g. to save or compare) and still runs."""
    q = converted_net
    clone = copy.deepcopy(q)
    x = _batches((2, 3, 8, 8), 1, seed=4)[0]
    with torch.no_grad():
        assert torch.equal(q(x), clone(x))
