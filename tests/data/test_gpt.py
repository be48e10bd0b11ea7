"""The TinyGPT, perplexity, calibration windows and the cache (tiny configs, no long training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.data import gpt as gpt_module
from lowbit.data import text
from lowbit.data.gpt import GPT_RECIPE, GPTRecipe, TinyGPT, perplexity, pretrained_tiny_gpt

TINY = GPTRecipe(n_layer=1, n_head=2, n_embd=16, block_size=16, steps=3, batch_size=2, warmup=1)


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    m = TinyGPT(vocab_size=12, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    ids = torch.randint(0, 12, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 12
    with torch.no_grad():
        a, b = m(ids), m(changed)
    assert torch.equal(a[0, :5], b[0, :5])
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_gpt_rejects_bad_inputs() -> None:
    m = TinyGPT(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="exceed block_size=8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer character ids"):
        m(torch.zeros(1, 8))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 7)

    assert perplexity(Uniform(), torch.randint(0, 7, (500,)), block_size=10) == pytest.approx(7.0)


def test_default_model_has_one_to_five_million_parameters() -> None:
    m = TinyGPT(vocab_size=84, block_size=GPT_RECIPE.block_size, n_layer=GPT_RECIPE.n_layer,
                n_head=GPT_RECIPE.n_head, n_embd=GPT_RECIPE.n_embd)  # fmt: skip
    assert 1_000_000 <= sum(p.numel() for p in m.parameters()) <= 5_000_000
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(mod.in_features % 128 == 0 for mod in linears)  # per_group:128 fits


def test_training_is_cached(small_text: None, tmp_path: Path) -> None:
    first = pretrained_tiny_gpt(tmp_path, progress=False, recipe=TINY)
    files = list(tmp_path.glob("tiny_gpt_shakespeare-*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert {"train_seconds", "held_out_perplexity", "recipe"} <= set(f.metadata())
    again = pretrained_tiny_gpt(tmp_path, progress=False, recipe=TINY)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_calibration_windows_come_from_train(small_text: None) -> None:
    batches = gpt_module.text_calibration_batches(2, 3, block_size=8)
    assert [tuple(b.shape) for b in batches] == [(3, 8), (3, 8)]
    assert "brave" not in "".join(text.decode(row) for b in batches for row in b)


def test_weight_only_quantization_keeps_a_tiny_gpt_close() -> None:
    torch.manual_seed(0)
    m = TinyGPT(vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=128).eval()
    tokens = torch.randint(0, 12, (400,))
    q = lowbit.quantize(m, "w8a16")
    assert perplexity(q, tokens, block_size=16) == pytest.approx(
        perplexity(m, tokens, block_size=16), rel=0.01
    )


def test_perplexity_max_windows_uses_only_the_first_windows() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 7)

    calls: list[int] = []
    model = Uniform()
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    tokens = torch.randint(0, 7, (500,))
    assert perplexity(model, tokens, block_size=10, batch_size=4, max_windows=6) == pytest.approx(7)
    assert calls == [4, 2]


def test_perplexity_restores_train_mode_and_rejects_bad_tokens() -> None:
    m = TinyGPT(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16).train()
    perplexity(m, torch.randint(0, 12, (40,)), block_size=8)
    assert m.training
    with pytest.raises(ValueError, match="1-D tensor of character ids"):
        perplexity(m, torch.zeros(40), block_size=8)
    with pytest.raises(ValueError, match="need more than 8 tokens"):
        perplexity(m, torch.zeros(8, dtype=torch.long), block_size=8)


def test_dropout_acts_in_train_mode_only() -> None:
    torch.manual_seed(0)
    m = TinyGPT(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    ids = torch.randint(0, 12, (2, 8))
    with torch.no_grad():
        assert torch.equal(m.eval()(ids), m(ids))
        assert not torch.equal(m.train()(ids), m(ids))
    with pytest.raises(ValueError, match="dropout must be in"):
        TinyGPT(vocab_size=12, dropout=1.0)


def test_calibration_windows_are_seeded(small_text: None) -> None:
    a = gpt_module.text_calibration_batches(2, 3, block_size=8, seed=1)
    b = gpt_module.text_calibration_batches(2, 3, block_size=8, seed=1)
    assert all(x.equal(y) and x.dtype == torch.int64 for x, y in zip(a, b, strict=True))
