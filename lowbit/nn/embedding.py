"""QEmbedding: an ``nn.Embedding`` with a quantized table, and the kernels that look rows up.

Embeddings are quantized weight-only: their input is indices, so there is no input quantizer,
and a recipe gives them a weight spec of their own (``embedding:`` in the YAML, see
:mod:`lowbit.config`). Frozen, the table stays in its integers (int8 as they are, int4 and
narrower packed two or more to a byte) and a lookup gathers only the rows it needs, then
dequantizes those rows in the table's float dtype: the float table is never rebuilt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.kernels import Kernel, LayerView, register_kernel
from lowbit.nn.module import QModule, register_qmodule
from lowbit.nn.qtensor import QTensor
from lowbit.primitives import dequantize
from lowbit.spec import PerChannel, PerGroup, QuantSpec, SpecError

__all__ = ["QEmbedding", "GatherKernel", "EmbeddingReference", "gather_rows"]


def _packed_rows(t: QTensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a packed sub-byte (rows, dim) table as plain integers (n, dim).

    Row ``r`` holds values ``r*dim .. r*dim + dim - 1`` of the packed stream; with an odd
    width (int4, dim odd) it starts in the middle of a byte, so each row's bytes are gathered
    with one byte of slack and the values shifted into place.
    """
    assert t.qdtype is not None
    width = t.qdtype.storage_bits
    per_byte = 8 // width
    dim = t.shape[1]
    first = idx * dim  # (n,) index of each row's first value in the stream
    start = first // per_byte  # (n,) byte holding it
    skip = first % per_byte  # (n,) values of another row before it in that byte
    nbytes = (dim + per_byte - 1) // per_byte + 1  # one byte of slack for the offset
    offsets = torch.arange(nbytes, device=idx.device)
    where = (start[:, None] + offsets).clamp_(max=t.qdata.numel() - 1)  # (n, bytes)
    data = t.qdata[where].to(torch.int32)  # (n, bytes)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=idx.device) * width
    fields = (data[..., None] >> shifts) & ((1 << width) - 1)  # (n, bytes, per_byte)
    fields = fields.reshape(len(idx), -1)  # (n, bytes * per_byte), lowest bits first
    cols = skip[:, None] + torch.arange(dim, device=idx.device)  # (n, dim)
    values = fields.gather(1, cols) + t.qdtype.qmin  # (n, dim)
    return values.to(torch.int8 if t.qdtype.signed else torch.uint8)


def gather_rows(t: QTensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``idx`` (1-d, valid indices) of a quantized 2-d table, dequantized to ``dtype``;
    only those rows are unpacked and dequantized.

    >>> table = QTensor.quantize(torch.randn(5, 3), QuantSpec("int4", "per_channel"))
    >>> rows = gather_rows(table, torch.tensor([4, 0, 4]), torch.float32)
    >>> torch.equal(rows, table.dequantize()[[4, 0, 4]])
    True
    """
    packed = t.layout_name == "packed"
    ints = _packed_rows(t, idx) if packed else t.int_repr().index_select(0, idx)  # (n, dim)
    gran = t.granularity
    scale, zero = t.scale, t.zero_point
    if isinstance(gran, PerGroup) or (isinstance(gran, PerChannel) and gran.axis in (0, -2)):
        scale, zero = scale.index_select(0, idx), zero.index_select(0, idx)  # one per row
    return dequantize(ints, scale, zero, gran).to(dtype)


@register_qmodule(nn.Embedding)
class QEmbedding(QModule, nn.Embedding):  # type: ignore[misc]  # Embedding declares freeze: bool
    """An Embedding whose table is quantized (weight-only: its input is indices).

    >>> q = QEmbedding.from_float(torch.nn.Embedding(10, 4, padding_idx=0), QuantSpec("int8"))
    >>> q.freeze()
    >>> out = q(torch.tensor([[0, 3]]))
    >>> out.shape, out[0, 0].abs().sum().item(), q.kernel_name
    (torch.Size([1, 2, 4]), 0.0, 'gather')
    """

    kind = "embedding"

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QModule:
        """Wrap a float Embedding; ``input`` must be None (an embedding's input is indices)."""
        label = name or type(module).__name__
        if input is not None:
            raise SpecError(
                f"{label}: an embedding's input is indices, which are not quantized; give "
                "embeddings a weight-only config (input: null)"
            )
        if weight is None:
            raise SpecError(
                f"{label}: an embedding has only its table to quantize; give it a weight spec "
                "or keep it in float (config: null)"
            )
        return super().from_float(module, weight, None, name)

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.Embedding)
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "max_norm": module.max_norm,
            "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }

    @classmethod
    def float_unsupported(cls, module: nn.Module) -> str | None:
        """Why this Embedding cannot have a quantized table (None when it can)."""
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return (
                f"max_norm={module.max_norm} renormalises the embedding table in place on "
                "every lookup, which a quantized table cannot do"
            )
        return None

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.embedding(
            x,
            weight,
            self.padding_idx,
            None,  # max_norm layers stay float (float_unsupported)
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{self.label}: an embedding takes integer indices (int64 or int32), got "
                f"{x.dtype}; pass token ids, not embeddings or floats"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.frozen:
            return self.runner(x)(x)
        return self.float_forward(x, self.quantized_weight(), None)


def _check_indices(layer: QModule, x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened to int64, every index checked against the table's rows."""
    idx = x.reshape(-1).long()  # (n,)
    rows = layer.weight.shape[0]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise IndexError(
            f"{layer.label}: index {bad} is out of range for an embedding of {rows} rows; "
            f"token ids must be in [0, {rows - 1}] (check the tokenizer matches the model)"
        )
    return idx


@register_kernel("embedding")
class GatherKernel(Kernel):
    """Gathers the integer rows the indices name and dequantizes only those, in the table's
    float dtype (int8 rows as they are, packed int4/int2 rows unpacked on the fly)."""

    name = "gather"
    priority = 100

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        if view.weight_spec is None:
            return "the table stays float"
        if len(view.weight_shape) != 2:
            return f"a {len(view.weight_shape)}-d table"
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = layer.weight
        assert isinstance(weight, QTensor), f"{layer.label} is not frozen"
        idx = _check_indices(layer, x)
        rows = gather_rows(weight, idx, weight.dtype)  # (n, dim)
        return rows.reshape(*x.shape, weight.shape[1])


@register_kernel("embedding")
class EmbeddingReference(Kernel):
    """lowbit's simulation for embeddings: the whole table dequantized, then the float lookup
    (what :class:`GatherKernel` is tested against; slow for large tables)."""

    name = "reference"
    priority = -1000

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = layer.weight
        table = weight.dequantize() if isinstance(weight, QTensor) else weight
        return layer.float_forward(x, table, None)
