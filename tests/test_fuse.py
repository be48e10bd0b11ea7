"""Tests for lowbit.fuse: batch-norm folding in place, with fx tracing and a Sequential fallback."""

from __future__ import annotations

import copy
import doctest
import logging
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import nn

import lowbit.fuse
from lowbit.fuse import FoldPair, apply_fold_structure, find_foldable, fold_batchnorm
from lowbit.report.metrics import sqnr_db

MIN_SQNR_DB = 60.0
M = TypeVar("M", bound=nn.Module)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _warm_up(model: M, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> M:
    """Random affine BN parameters and non-trivial running stats; returns the model in eval."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
        model.train()
        for _ in range(3):
            model(torch.randn(shape, generator=gen, dtype=dtype) * 3.0 + 1.0)
    return model.eval()


class Block(nn.Module):
    """Residual block: conv(no bias)-BN-ReLU, depthwise conv-BN, 1x1 conv-BN shortcut, add."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.dw(y))
        return torch.relu(y + self.shortcut_bn(self.shortcut(x)))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8, 16)
        self.fc = nn.Linear(16, 32)
        self.fc_bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.stem(x)).mean(dim=(2, 3))  # (N, 16)
        return self.head(torch.relu(self.fc_bn(self.fc(y))))


RESNET_PAIRS = {
    FoldPair("stem.0", "stem.1"),
    FoldPair("block.conv1", "block.bn1"),
    FoldPair("block.dw", "block.bn2"),
    FoldPair("block.shortcut", "block.shortcut_bn"),
    FoldPair("fc", "fc_bn"),
}


def test_resnet_like_folds_everything_and_keeps_outputs() -> None:
    model = _warm_up(ResNetLike(), (8, 3, 10, 10))
    x = torch.randn(4, 3, 10, 10)
    before = model(x)

    pairs, notes = find_foldable(model)
    assert set(pairs) == RESNET_PAIRS and notes == []
    folded = fold_batchnorm(model)

    assert set(folded) == RESNET_PAIRS
    assert type(model) is ResNetLike and type(model.block) is Block
    assert not _has_batchnorm(model)
    assert isinstance(model.block.conv1.bias, nn.Parameter)  # created for the bias-less conv
    assert sqnr_db(before, model(x)) >= MIN_SQNR_DB


def test_fold_uses_running_stats_even_in_train_mode_and_under_no_grad() -> None:
    model = _warm_up(ResNetLike(), (8, 3, 10, 10))
    x = torch.randn(4, 3, 10, 10)
    before = model(x)
    model.train()
    weight = model.block.dw.weight
    with torch.no_grad():
        fold_batchnorm(model)
    assert model.block.dw.weight is weight  # updated in place, optimizers keep their reference
    bias = model.block.conv1.bias
    assert weight.requires_grad and bias is not None and bias.requires_grad
    assert sqnr_db(before, model.eval()(x)) >= MIN_SQNR_DB


# name -> (layer, batch norm, input shape); built fresh per test
LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), lambda: nn.BatchNorm1d(6), (5, 4, 9)),
    "conv2d-no-bias": (
        lambda: nn.Conv2d(4, 6, 3, bias=False),
        lambda: nn.BatchNorm2d(6),
        (5, 4, 7, 7),
    ),
    "conv2d-grouped": (
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda: nn.BatchNorm2d(6),
        (5, 4, 7, 7),
    ),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6), lambda: nn.BatchNorm2d(6), (5, 6, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3), lambda: nn.BatchNorm3d(6), (5, 4, 5, 5, 5)),
    "linear": (lambda: nn.Linear(4, 6), lambda: nn.BatchNorm1d(6), (5, 4)),
    "bn-affine-false": (lambda: nn.Linear(4, 6), lambda: nn.BatchNorm1d(6, affine=False), (5, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_single_pair_matches_unfolded(case: str, dtype: torch.dtype) -> None:
    make_layer, make_bn, shape = LAYER_CASES[case]
    model = nn.Sequential(make_layer(), make_bn()).to(dtype)
    _warm_up(model, shape, dtype)
    x = torch.randn(shape, dtype=dtype)
    before = model(x)
    assert fold_batchnorm(model) == [FoldPair("0", "1")]
    assert isinstance(model[1], nn.Identity)
    assert model[0].weight.dtype == dtype and model[0].bias.dtype == dtype
    assert sqnr_db(before, model(x)) >= MIN_SQNR_DB


class Untraceable(nn.Module):
    """Data-dependent control flow and a shape check: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.extra = nn.Conv2d(8, 8, 1)
        self.extra_bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 input channels, got {x.shape[1]}")
        y = self.features(x)
        if y.sum() > 0:
            y = self.extra_bn(self.extra(y))
        return y


def test_untraceable_model_falls_back_to_sequential(caplog: pytest.LogCaptureFixture) -> None:
    model = _warm_up(Untraceable(), (8, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    before = model(x)

    with caplog.at_level(logging.INFO, logger="lowbit.fuse"):
        pairs, notes = find_foldable(model)
    assert pairs == [FoldPair("features.0", "features.1"), FoldPair("features.3", "features.4")]
    assert "could not trace Untraceable" in notes[0] and "nn.Sequential" in notes[0]
    assert any("'extra_bn'" in note for note in notes[1:])
    assert "could not trace Untraceable" in caplog.text

    assert fold_batchnorm(model) == pairs
    assert type(model) is Untraceable
    assert isinstance(model.extra_bn, nn.BatchNorm2d)  # outside any Sequential: left alone
    assert sqnr_db(before, model(x)) >= MIN_SQNR_DB


class CustomSequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the conv output also skips the BN
        y = self[0](x)
        return self[1](y) + y


class UntraceableCustomSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = CustomSequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > 0 else x


def test_fallback_ignores_sequential_subclass_with_own_forward() -> None:
    pairs, notes = find_foldable(UntraceableCustomSequential())
    assert pairs == []
    assert "could not trace" in notes[0] and "'body.1' not folded" in notes[1]


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_used_elsewhere_is_not_folded() -> None:
    model = SharedOutput()
    pairs, notes = find_foldable(model)
    assert pairs == []
    assert len(notes) == 1 and "'bn'" in notes[0] and "also used by" in notes[0]
    assert fold_batchnorm(model) == [] and isinstance(model.bn, nn.BatchNorm2d)


class BnCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


class ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (BnCalledTwice(), "called 2 times"),
        (ConvCalledTwice(), "'conv' is called 2 times"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
            "no running statistics",
        ),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)), "must be followed by a BatchNorm2d"),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), "a ReLU"),
    ],
    ids=["bn-twice", "conv-twice", "no-stats", "wrong-bn-dim", "after-relu"],
)
def test_unfoldable_patterns_are_noted(model: nn.Module, expected: str) -> None:
    pairs, notes = find_foldable(model)
    assert pairs == []
    assert len(notes) == 1 and expected in notes[0]


def test_shared_layer_is_not_folded() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied weights: folding would change the other layer
    pairs, notes = find_foldable(model)
    assert pairs == [] and "shared" in notes[0]


def test_apply_fold_structure_matches_fold_batchnorm() -> None:
    folded = _warm_up(ResNetLike(), (8, 3, 10, 10))
    structured = copy.deepcopy(folded)
    weight_before = structured.block.conv1.weight.clone()
    pairs = fold_batchnorm(folded)

    assert apply_fold_structure(structured, pairs) == pairs
    assert type(structured) is ResNetLike
    assert [(n, type(m)) for n, m in structured.named_modules()] == [
        (n, type(m)) for n, m in folded.named_modules()
    ]
    shapes = {k: (v.shape, v.dtype) for k, v in structured.state_dict().items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in folded.state_dict().items()}
    assert torch.equal(structured.block.conv1.weight, weight_before)  # values untouched
    bias = structured.block.conv1.bias
    assert bias is not None and not bias.any()

    structured.load_state_dict(folded.state_dict())  # as when loading a saved folded model
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(structured(x), folded(x))


def test_bad_pairs_raise_clear_errors_and_change_nothing() -> None:
    model = _warm_up(ResNetLike(), (8, 3, 10, 10))
    good = FoldPair("block.dw", "block.bn2")
    cases = [
        (FoldPair("stem.0", "stem.9"), "no submodule 'stem.9'"),
        (FoldPair("", "stem.1"), "no submodule ''"),
        (FoldPair("stem.1", "stem.0"), "'stem.1' is a BatchNorm2d, not a Conv1d"),
        (FoldPair("stem.0", "block.bn1"), "8 output channels but 'block.bn1' normalizes 16"),
        (FoldPair("fc", "block.bn1"), "must be followed by a BatchNorm1d"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            fold_batchnorm(model, [good, bad])
        assert isinstance(model.block.bn2, nn.BatchNorm2d)  # validated before any change
    with pytest.raises(ValueError, match="more than one pair"):
        fold_batchnorm(model, [good, good])
    with pytest.raises(ValueError, match="expected FoldPair"):
        fold_batchnorm(model, [("block.dw", "block.bn2")])  # type: ignore[list-item]

    fold_batchnorm(model, [good])
    with pytest.raises(ValueError, match="already folded"):
        fold_batchnorm(model, [good])
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        apply_fold_structure(model, [FoldPair("nope", "stem.1")])
    assert isinstance(model.stem[1], nn.BatchNorm2d)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(lowbit.fuse)
    assert result.attempted > 0 and result.failed == 0


def test_model_without_batch_norm_is_not_traced(caplog: pytest.LogCaptureFixture) -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.fc(x)
            return -self.fc(x)

    with caplog.at_level("INFO", logger="lowbit.fuse"):
        assert find_foldable(Untraceable()) == ([], [])
    assert not caplog.records  # nothing to fold, so no warning about tracing


@pytest.mark.parametrize("var", [0.0, 1e-8, 1e-6, 1e-5, 3e-5])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_running_variance_near_eps_folds_finite_and_accurate(kind: str, var: float) -> None:
    """A channel whose running variance is ~0 (dead, or constant in training) gets a scale of
    up to 1/sqrt(eps) ~ 316: the fold must stay finite and as exact as the unfolded pair."""
    torch.manual_seed(0)
    if kind == "conv":
        layer, bn, x = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), torch.randn(4, 3, 8, 8)
    else:
        layer, bn, x = nn.Linear(5, 6), nn.BatchNorm1d(6), torch.randn(16, 5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.5)
        bn.running_var[::2] = var  # every other channel at (or below) eps
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6))
    model = nn.Sequential(layer, bn).eval()
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model) == [FoldPair("0", "1")]
        assert isinstance(model[1], nn.Identity)
        assert torch.isfinite(model[0].weight).all() and torch.isfinite(model[0].bias).all()
        got = model(x)
    assert torch.isfinite(got).all()
    assert sqnr_db(expected, got) >= MIN_SQNR_DB


class _ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _ConvBlock()
        self.leak = nn.Conv2d(8, 8, 1)
        self.leak_norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.leak_norm(self.leak(y))


def test_untraceable_model_folds_inside_blocks_that_trace() -> None:
    model = _Untraceable().eval()
    for bn in (model.block.norm, model.leak_norm):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    pairs, notes = find_foldable(model)
    assert pairs == [FoldPair(layer="block.conv", bn="block.norm")]
    assert any("could not trace" in n for n in notes)
    assert any("'leak_norm' not folded" in n for n in notes)
    fold_batchnorm(model, pairs)
    assert isinstance(model.block.norm, nn.Identity)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
