"""lowbit: quantize PyTorch models into really smaller, really faster low-bit models."""

__version__ = "0.1.0"
