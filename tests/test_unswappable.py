"""Never lose a user's forward: overridden forwards, parametrizations, weight-norm hooks and other
hooks keep a layer in float with its reason; plain subclasses are still quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lowbit
from lowbit.nn import QConv2d, QLinear, unswappable_reason


class AffineLinear(nn.Linear):
    """A Linear whose forward is its own: 2 * (W x + b) + 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x) + 1


class NamedLinear(nn.Linear):
    """A subclass that only adds an attribute: its forward is nn.Linear's."""

    tag = "kept"


class CustomConv(nn.Conv2d):
    """Overrides the method nn.Conv2d.forward calls, not forward itself."""

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return super()._conv_forward(x, weight.flip(-1), bias)


class CustomConv1d(nn.Conv1d):
    """Overrides _conv_forward: kept float."""

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return super()._conv_forward(x, -weight, bias)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(AffineLinear(8, 8), nn.ReLU(), NamedLinear(8, 4)).eval()


def test_a_forward_extending_super_forward_is_quantized_and_kept() -> None:
    model = _model()
    x = torch.randn(16, 8)
    q = lowbit.quantize(model, "w8a8", data=[x])
    assert isinstance(q[0], AffineLinear) and isinstance(q[0], QLinear)  # its forward, quantized
    assert type(q[0]).__mro__[1] is AffineLinear  # the user's forward runs first
    assert isinstance(q[2], QLinear)  # no forward of its own: quantized
    assert "0" not in lowbit.prepared_info(q).kept_float
    assert isinstance(q[0].weight, lowbit.nn.QTensor)
    with torch.no_grad():
        want, got = model(x), q(x)
        plain = q[2](torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias)))
    assert lowbit.sqnr_db(want, got) >= 30.0
    assert lowbit.sqnr_db(want, plain) < 15.0  # what a plain quantized Linear would give


def test_overriding_a_helper_of_forward_counts_too() -> None:
    conv = CustomConv(2, 2, 3)
    assert "CustomConv overrides Conv2d._conv_forward()" in (unswappable_reason(conv) or "")
    assert unswappable_reason(nn.Conv2d(2, 2, 3)) is None


def test_instance_forward_replaced_stays_float() -> None:
    layer = nn.Linear(4, 4)
    layer.forward = lambda x: x  # type: ignore[method-assign]  # what accelerate's hooks do
    assert "forward was replaced on the instance" in (unswappable_reason(layer) or "")


@pytest.mark.parametrize("style", ["parametrizations", "old"])
def test_weight_norm_is_folded_into_the_inference_weight_and_quantized(style: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3)
    if style == "parametrizations":
        conv = parametrizations.weight_norm(conv)
    else:
        conv = torch.nn.utils.weight_norm(conv)  # deprecated: weight_g, weight_v and a hook
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv1d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        model(x)
    q = lowbit.quantize(model, "w8a8", data=[x])
    assert "0: weight_norm folded" in " ".join(lowbit.prepared_info(q).notes)
    assert isinstance(q[0], lowbit.nn.QModule) and isinstance(q[2], lowbit.nn.QModule)
    assert parametrize.is_parametrized(model[0]) == (style == "parametrizations")  # untouched
    with torch.no_grad():
        assert lowbit.sqnr_db(model(x), q(x)) >= 30.0


def test_other_parametrizations_keep_the_layer_float() -> None:
    layer = parametrizations.spectral_norm(nn.Linear(4, 4))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2)).eval()
    q = lowbit.quantize(model, "w8a16")
    assert "is parametrized" in lowbit.prepared_info(q).kept_float["0"]


def test_parametrized_linear_names_its_parametrization() -> None:
    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).t()

    layer = parametrize.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    assert "its weight is parametrized (Symmetric" in (unswappable_reason(layer) or "")


def test_a_forward_pre_hook_that_rewrites_the_weight_keeps_the_layer_float() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()

    def halve(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        module.weight.data.mul_(0.5)

    model[0].register_forward_pre_hook(halve)
    x = torch.randn(1, 2, 6, 6)
    q = lowbit.quantize(model, "w8a16")
    reason = lowbit.prepared_info(q).kept_float["0"]
    assert "a forward pre-hook (" in reason and "halve" in reason
    assert "remove the hook before prepare()" in reason
    assert isinstance(q[2], QConv2d) and len(q[0]._forward_pre_hooks) == 1
    assert q(x).shape == (1, 4, 4, 4)


@pytest.mark.parametrize("style", ["parametrizations", "old"])
def test_layers_kept_float_round_trip_through_a_file(style: str, tmp_path: Path) -> None:
    def build(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        conv = nn.Conv1d(3, 4, 3)
        if style == "parametrizations":
            conv = parametrizations.spectral_norm(conv)
        else:
            conv = torch.nn.utils.spectral_norm(conv)
        layers = [conv, nn.ReLU(), CustomConv1d(4, 4, 1), nn.Flatten(), AffineLinear(32, 3)]
        model = nn.Sequential(*layers).eval()
        with torch.no_grad():  # see test_weight_norm_conv1d_stays_float
            model(torch.randn(1, 3, 10))
        return model

    x = torch.randn(2, 3, 10)
    q = lowbit.quantize(build(0), "w8a8", data=[x])
    back = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"), build(1))
    assert sorted(lowbit.prepared_info(back).kept_float) == ["0", "2"]
    assert isinstance(back[4], lowbit.nn.QModule) and isinstance(back[4], AffineLinear)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))  # the float layers' weights came from the file too


def test_pruned_and_spectral_normed_layers_name_the_undo() -> None:
    pruned = torch.nn.utils.prune.l1_unstructured(nn.Linear(4, 4), "weight", amount=0.5)
    assert "prune.remove(layer, 'weight') first" in (unswappable_reason(pruned) or "")
    normed = torch.nn.utils.spectral_norm(nn.Linear(4, 4))
    assert "remove_spectral_norm(layer) first" in (unswappable_reason(normed) or "")
    torch.nn.utils.prune.remove(pruned, "weight")  # permanent: a plain Linear again
    assert unswappable_reason(pruned) is None


def test_old_style_weight_norm_models_with_a_graph_carrying_weight_quantize() -> None:
    import warnings

    import lowbit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(4, 4, 3))
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(24, 2))
    x = torch.randn(2, 4, 8)
    expected = model(x)  # a graph-carrying weight: what torch cannot deep-copy
    q = lowbit.quantize(model, "w8a16")
    assert "0: weight_norm folded" in " ".join(lowbit.prepared_info(q).notes)
    assert isinstance(q[0], lowbit.nn.QModule)
    assert lowbit.sqnr_db(expected, q(x)) > 30
