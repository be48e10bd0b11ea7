"""Measuring what quantization cost: metrics, per-layer analysis and reports."""

from lowbit.report.metrics import accuracy, cosine_similarity, sqnr_db

__all__ = ["accuracy", "cosine_similarity", "sqnr_db"]
