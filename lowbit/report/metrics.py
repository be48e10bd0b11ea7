"""Error metrics: signal-to-quantization-noise ratio in dB, cosine similarity, accuracy."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB.

    ``10 * log10(sum(ref^2) / sum((ref - test)^2))``; ``inf`` when they are identical.

    >>> import torch
    >>> x = torch.ones(100)
    >>> round(sqnr_db(x, x + 0.01), 1)
    40.0
    """
    if reference.shape != test.shape:
        raise ValueError(
            f"sqnr_db: shapes differ, reference {tuple(reference.shape)} vs test "
            f"{tuple(test.shape)}; compare outputs of the same layer or model"
        )
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened.

    >>> import torch
    >>> cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    1.0
    """
    a = reference.detach().double().flatten()
    b = test.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0).item())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (0..1) of ``logits`` (N, classes) against integer ``labels`` (N,).

    >>> import torch
    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"accuracy: expected logits (N, classes) and labels (N,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return float((logits.argmax(dim=1) == labels).float().mean().item())
