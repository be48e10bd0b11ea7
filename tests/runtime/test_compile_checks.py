"""lowbit.compile's agreement checks: layer by layer where the model amplifies float rounding,
per-token inputs quantized once for the layers that share them, and inductor's compiled passes
computing what the eager ones do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import inductor, opscheck
from lowbit.runtime.activation import LastInput
from lowbit.runtime.linear import OneDNNInt8Linear

pytestmark = pytest.mark.skipif(
    opscheck.available("onednn_qlinear") is not None, reason="no oneDNN int8 on this machine"
)


class Attention(nn.Module):
    """Query, key and value projections of one input, then a chaotic amplifier: tiny output
    differences are blown up by a steep softmax, as in pretrained transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * 50.0  # (batch, tokens, tokens)
        return torch.softmax(scores, dim=-1) @ self.v(x)


def test_query_key_value_quantize_their_shared_input_once() -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 6, 32)
    q = lowbit.quantize(model, "w8a8-dynamic-token", data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    kernels = [layer.kernel_for(torch.float32) for layer in (q.q, q.k, q.v)]
    assert all(isinstance(k, OneDNNInt8Linear) and k.per_token for k in kernels)
    shared = {id(k.shared) for k in kernels}  # type: ignore[union-attr]
    assert len(shared) == 1 and isinstance(kernels[0].shared, LastInput)  # type: ignore[union-attr]
    calls = []
    grid = kernels[0].grid  # type: ignore[union-attr]
    original = grid.per_token
    object.__setattr__(grid, "per_token", lambda t: calls.append(1) or original(t))
    try:
        with torch.no_grad():
            compiled(torch.randn(2, 6, 32))
    finally:
        object.__delattr__(grid, "per_token")
    assert len(calls) == 1  # not 3


class Amplifier(nn.Module):
    """Rounds its Linear's output to a fine grid: the last float bit of a difference decides
    whole steps of the output, the way outliers amplify rounding in pretrained transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.frac(self.fc(x) * 1e5)  # digits a float rounding changes


def test_a_model_that_amplifies_rounding_is_accepted_layer_by_layer() -> None:
    torch.manual_seed(0)
    model = Amplifier().eval()
    x = torch.randn(64, 32)
    q = lowbit.quantize(model, "w8a8-dynamic-token", data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x, min_sqnr_db=100.0)
    report = lowbit.kernel_report(compiled)
    assert report.sqnr_db is not None and report.sqnr_db < 100.0  # the output disagrees
    assert report.backend == "torch" and {r.kernel for r in report.layers} == {"onednn-int8"}
    assert report.layer_sqnr_db is not None and report.layer_sqnr_db >= 100.0
    assert any("amplifies float rounding" in note for note in report.notes)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w8a8-dynamic-token"])
def test_inductor_passes_compute_what_the_eager_ones_do(recipe: str) -> None:
    if inductor.available() is not None:
        pytest.skip(str(inductor.available()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    x = torch.randn(3, 7, 64)
    q = lowbit.quantize(model, recipe, data=[x])
    with torch.no_grad():
        eager = q(x)
        compiled = lowbit.compile(q, "torch", example_inputs=x, inductor=True)
        assert any("inductor" in n for n in lowbit.kernel_report(compiled).notes)
        assert lowbit.sqnr_db(eager, compiled(x)) > 100.0
