"""A tiny character-level GPT (nanoGPT-shaped) trained on Shakespeare: the model weight-only
low-bit PTQ (GPTQ, AWQ) is measured on, by perplexity on a held-out play.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.text import load_shakespeare, vocabulary
from lowbit.data.training import default_cache_dir, load_weights, save_weights

__all__ = [
    "TinyGPT",
    "GPTRecipe",
    "GPT_RECIPE",
    "perplexity",
    "pretrained_tiny_gpt",
    "text_calibration_batches",
]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``c_attn`` Linear for q, k, v, then ``c_proj``.

    >>> CausalSelfAttention(16, 2)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 4, 16])
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (N, h, T, c/h)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(n, t, c)))  # (N, T, C)


class MLP(nn.Module):
    """``c_fc`` (4x wider), GELU, ``c_proj``.

    >>> MLP(16)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 4, 16])
    """

    def __init__(self, n_embd: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    >>> Block(16, 2)(torch.zeros(1, 4, 16)).shape
    torch.Size([1, 4, 16])
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A character-level GPT: token and position embeddings, ``n_layer`` pre-LN blocks, a
    final LayerNorm and an untied ``lm_head``. ``forward(ids)`` -> logits ``(N, T, vocab)``.
    ``dropout`` (attention, residual and embedding dropout) acts in train mode only; it adds no
    parameters, so a cached state dict loads whatever it is.

    >>> m = TinyGPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
    >>> m(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        n_layer: int = 6,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"TinyGPT: n_embd={n_embd} must be a multiple of n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TinyGPT: dropout must be in [0, 1), got {dropout}")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2:
            raise ValueError(
                f"TinyGPT takes (batch, time) integer character ids, got {ids.dtype} of shape "
                f"{tuple(ids.shape)}; encode text with lowbit.data.text.encode"
            )
        t = ids.shape[1]
        if t > self.block_size:
            raise ValueError(
                f"TinyGPT: {t} tokens exceed block_size={self.block_size}; feed windows of at "
                f"most {self.block_size} characters"
            )
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.wte(ids) + self.wpe(pos))  # (N, T, C)
        return self.lm_head(self.ln_f(self.blocks(x)))


def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    block_size: int = 128,
    batch_size: int = 64,
    max_windows: int | None = None,
) -> float:
    """``exp`` of the mean next-character cross-entropy over non-overlapping windows of
    ``tokens`` (any callable returning logits; modules run in eval mode, without gradients,
    and get their train/eval mode back). ``max_windows`` keeps only the first windows, for a
    quicker, still deterministic estimate.

    >>> class Uniform(nn.Module):
    ...     def forward(self, ids): return torch.zeros(*ids.shape, 5)
    >>> round(perplexity(Uniform(), torch.randint(0, 5, (1000,)), block_size=16), 6)
    5.0
    """
    if tokens.ndim != 1 or tokens.is_floating_point():
        raise ValueError(
            f"perplexity: tokens must be a 1-D tensor of character ids, got {tokens.dtype} of "
            f"shape {tuple(tokens.shape)}; pass load_shakespeare('test')"
        )
    if block_size < 1 or batch_size < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(
            f"perplexity: block_size={block_size}, batch_size={batch_size} and "
            f"max_windows={max_windows} must be positive (max_windows=None uses every window)"
        )
    windows = (len(tokens) - 1) // block_size
    if windows < 1:
        raise ValueError(f"perplexity: need more than {block_size} tokens, got {len(tokens)}")
    windows = windows if max_windows is None else min(windows, max_windows)
    ids = tokens.long()
    inputs = ids[: windows * block_size].view(windows, block_size)  # (W, T)
    targets = ids[1 : windows * block_size + 1].view(windows, block_size)  # (W, T)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, windows, batch_size):
                logits = model(inputs[start : start + batch_size]).float()
                flat = logits.reshape(-1, logits.shape[-1])  # (W*T, vocab)
                labels = targets[start : start + batch_size].reshape(-1)  # (W*T,)
                total += float(F.cross_entropy(flat, labels, reduction="sum"))
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return math.exp(total / (windows * block_size))


def text_calibration_batches(
    n_batches: int, batch_size: int, block_size: int = 128, seed: int = 0
) -> list[torch.Tensor]:
    """``n_batches`` batches of random windows from the training plays, ``(N, T)`` int64, for
    PTQ calibration; the same ``seed`` gives the same windows (no global RNG is touched).

    >>> [b.shape for b in text_calibration_batches(2, 4, 16)]  # doctest: +SKIP
    [torch.Size([4, 16]), torch.Size([4, 16])]
    """
    if n_batches < 1 or batch_size < 1 or block_size < 1:
        raise ValueError(
            f"text_calibration_batches: n_batches={n_batches}, batch_size={batch_size} and "
            f"block_size={block_size} must all be positive"
        )
    tokens = load_shakespeare("train")
    if len(tokens) <= block_size:
        raise ValueError(
            f"text_calibration_batches: the training text has {len(tokens)} characters, not "
            f"more than block_size={block_size}; use a smaller block_size"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=gen)
        out.append(torch.stack([tokens[s : s + block_size] for s in starts.tolist()]))
    return out


@dataclasses.dataclass(frozen=True)
class GPTRecipe:
    """Architecture and training of the cached TinyGPT; its hash names the cache file.

    >>> len(GPTRecipe().digest())
    12
    """

    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    steps: int = 1200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0

    def digest(self) -> str:
        """A short hash of the recipe."""
        blob = json.dumps({"arch": "tiny_gpt-1", **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


GPT_RECIPE = GPTRecipe()


def _build(recipe: GPTRecipe) -> TinyGPT:
    return TinyGPT(
        len(vocabulary()), recipe.block_size, recipe.n_layer, recipe.n_head, recipe.n_embd
    )


def _train(model: TinyGPT, recipe: GPTRecipe, progress: bool) -> None:
    tokens = load_shakespeare("train")
    gen = torch.Generator().manual_seed(recipe.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": rest},  # AdamW's default decay
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=recipe.lr,
        betas=(0.9, 0.99),
    )

    def rate(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(recipe.steps - recipe.warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    t = recipe.block_size
    for _ in tqdm(range(recipe.steps), disable=not progress, desc="training TinyGPT"):
        starts = torch.randint(0, len(tokens) - t - 1, (recipe.batch_size,), generator=gen)
        x = torch.stack([tokens[s : s + t] for s in starts.tolist()])  # (N, T)
        y = torch.stack([tokens[s + 1 : s + t + 1] for s in starts.tolist()])
        logits = model(x)  # (N, T, vocab); float32: bf16 autocast measured ~20% slower here
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def pretrained_tiny_gpt(
    cache_dir: Path | None = None, progress: bool = True, *, recipe: GPTRecipe = GPT_RECIPE
) -> TinyGPT:
    """The TinyGPT trained on every play but the held-out one, in eval mode: trained once,
    then loaded from ``cache_dir`` (default :func:`default_cache_dir`), file
    ``tiny_gpt_shakespeare-<recipe hash>.safetensors``; a changed recipe retrains.

    The default recipe (6 layers, 4 heads, width 128: 1.23 M parameters, 1200 AdamW steps of
    16 windows of 128 characters) trains at about 0.28 s a step on 2 idle CPU cores, so
    about 5.5 minutes (the cached file records 948 s, trained while the CPU was shared), and
    reaches a held-out perplexity of 5.50 on :data:`~lowbit.data.text.HELD_OUT_PLAY`
    (both figures are in the file's metadata).

    >>> model = pretrained_tiny_gpt()  # doctest: +SKIP
    """
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = folder / f"tiny_gpt_shakespeare-{recipe.digest()}.safetensors"
    if path.is_file():
        try:
            return load_weights(_build(recipe), path).eval()  # type: ignore[return-value]
        except (SafetensorError, RuntimeError, OSError) as exc:
            warnings.warn(f"cached weights {path} are unreadable ({exc}); retraining", stacklevel=2)
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(recipe.seed)
        model = _build(recipe)
    start = time.perf_counter()
    _train(model, recipe, progress)
    seconds = time.perf_counter() - start
    held_out = perplexity(model, load_shakespeare("test"), recipe.block_size)
    metadata = {
        "recipe": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
        "train_seconds": f"{seconds:.1f}",
        "held_out_perplexity": f"{held_out:.4f}",
    }
    save_weights(model, path, metadata)
    return model
