"""Quantization-aware training: prepare, calibrate and train in one call, and a plain loop.

The pieces live lower down (``lowbit.prepare(model, recipe, qat=True)``, the learned and moving
ranges of :class:`lowbit.nn.Quantizer`, batch norm trained folded in :mod:`lowbit.nn.qat_bn`,
gradient quantization in :mod:`lowbit.nn.qat_ops`); this package puts them together.
"""

from __future__ import annotations

from lowbit.qat.loop import fit, prepare_qat
from lowbit.qat.session import EpochRecord, QatRun, QatSchedule, accuracy_on, train_qat

__all__ = [
    "EpochRecord",
    "QatRun",
    "QatSchedule",
    "accuracy_on",
    "fit",
    "prepare_qat",
    "train_qat",
]
