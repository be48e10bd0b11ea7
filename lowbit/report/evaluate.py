"""Evaluate a quantized model on real batches: top-1 where there are labels, and the output's
SQNR and cosine against the float model on every kind of batch (tensors, ``(inputs, labels)``
tuples, keyword mappings such as a tokenizer's ``BatchEncoding``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Evaluation", "evaluate", "output_tensor"]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured. ``top1`` is None without labels; ``sqnr_db`` and
    ``cosine`` are None without a reference model (both over all outputs at once)."""

    examples: int
    seconds: float
    top1: float | None = None
    reference_top1: float | None = None
    sqnr_db: float | None = None
    cosine: float | None = None


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, ``logits``, or the first tensor of a
    tuple or a transformers ``ModelOutput`` (``last_hidden_state``, ...).

    >>> output_tensor((torch.ones(2), None)).tolist()
    [1.0, 1.0]
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = out.values() if isinstance(out, Mapping) else out
    if isinstance(items, Iterable):
        for item in items:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor to judge")


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1] if isinstance(batch[1], torch.Tensor) else None
    return batch, None


def _run(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return output_tensor(out).detach().double()


def evaluate(
    model: nn.Module, data: Iterable[Any], reference: nn.Module | None = None
) -> Evaluation:
    """Run ``model`` (and ``reference``, the float model, when given) over ``data``.

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 3))
    >>> q = lowbit.quantize(net, "w8a16")
    >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,)))]
    >>> result = evaluate(q, data, reference=net)
    >>> result.examples, result.sqnr_db > 30, result.cosine > 0.999
    (16, True, True)
    """
    signal = noise = dot = norm_q = 0.0
    correct = ref_correct = labelled = examples = 0
    seconds = 0.0
    with torch.no_grad():
        for batch in data:
            inputs, labels = _split(batch)
            start = time.perf_counter()
            out = _run(model, inputs)
            seconds += time.perf_counter() - start
            examples += int(out.shape[0]) if out.ndim else 1
            ref = _run(reference, inputs) if reference is not None else None
            if ref is not None:
                if ref.shape != out.shape:
                    raise ValueError(
                        f"the quantized model's output has shape {tuple(out.shape)} but the "
                        f"float model's {tuple(ref.shape)}; compare models of one architecture"
                    )
                signal += float((ref * ref).sum())
                noise += float(((ref - out) ** 2).sum())
                dot += float((ref * out).sum())
                norm_q += float((out * out).sum())
            if labels is not None and out.ndim == 2 and labels.shape == out.shape[:1]:
                labelled += int(labels.numel())
                correct += int((out.argmax(dim=1) == labels).sum())
                if ref is not None:
                    ref_correct += int((ref.argmax(dim=1) == labels).sum())
    if examples == 0:
        raise ValueError("the data gave no batches; give an iterable of batches")
    sqnr = cosine = None
    if reference is not None:
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
        denom = math.sqrt(signal * norm_q)
        cosine = dot / denom if denom else 0.0
    return Evaluation(
        examples=examples,
        seconds=seconds,
        top1=correct / labelled if labelled else None,
        reference_top1=ref_correct / labelled if labelled and reference is not None else None,
        sqnr_db=sqnr,
        cosine=cosine,
    )
