"""Quantized nn.MultiheadAttention: the input and output projections run as quantized layers.

Torch's ``nn.MultiheadAttention`` hands its raw ``in_proj_weight`` and ``out_proj.weight``
to one functional call, so a quantized ``out_proj`` child would be skipped. Its twin here
splits the input projection into three child :class:`~lowbit.nn.layers.QLinear` layers
(``q_proj``, ``k_proj``, ``v_proj``: the rows of ``in_proj_weight``, or the separate
``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ) and calls ``out_proj`` as a layer, which
``prepare()`` quantizes like any Linear. Each projection has its own input quantizer, so a
cross-attention's query and memory are calibrated separately. The attention itself (masks,
``add_bias_kv``, ``add_zero_attn``, dropout, softmax) is torch's float computation, step for
step as ``F.multi_head_attention_forward`` does it.

The three projections are new parameters (copies of the rows of ``in_proj_weight``): for
quantization-aware training, build the optimizer after ``prepare()``. A recipe rule applies to
the attention as a whole (its name), not to ``q_proj``/``k_proj``/``v_proj`` one by one;
``out_proj`` is a layer of the float model and takes rules of its own.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.children import drop_parameters, linear_child
from lowbit.nn.layers import QLinear
from lowbit.nn.module import register_qmodule
from lowbit.nn.parent import QParent
from lowbit.spec import QuantSpec

__all__ = ["QMultiheadAttention"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _canonical_mask(
    mask: torch.Tensor | None, name: str, dtype: torch.dtype, other: torch.Tensor | None = None
) -> torch.Tensor | None:
    """A bool mask (True: not attended) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise TypeError(
            f"MultiheadAttention: {name} is {mask.dtype}; only bool (True = masked) and float "
            "(added to the scores) masks are supported"
        )
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {name} and attn_mask is deprecated. Use same type for "
            "both instead.",
            stacklevel=3,
        )
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _shape_check(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    num_heads: int,
) -> bool:
    """Whether the inputs are batched; a ValueError naming the tensor for wrong dimensions."""
    if query.dim() not in (2, 3):
        raise ValueError(
            f"MultiheadAttention: query must be 2-D (unbatched) or 3-D (batched), got "
            f"{query.dim()}-D"
        )
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"MultiheadAttention: for a {query.dim()}-D query, key and value must be "
            f"{query.dim()}-D too, got {key.dim()}-D and {value.dim()}-D"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise ValueError(
            f"MultiheadAttention: key_padding_mask must be {query.dim() - 1}-D for a "
            f"{query.dim()}-D query, got {key_padding_mask.dim()}-D"
        )
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(
            f"MultiheadAttention: attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D"
        )
    if not batched and attn_mask is not None and attn_mask.dim() == 3:
        expected = (num_heads, query.shape[0], key.shape[0])
        if tuple(attn_mask.shape) != expected:
            raise ValueError(
                f"MultiheadAttention: expected attn_mask of shape {list(expected)} for an "
                f"unbatched query, got {list(attn_mask.shape)}"
            )
    return batched


def _check_attn_mask(
    mask: torch.Tensor | None, tgt_len: int, src_len: int, batch_heads: int
) -> torch.Tensor | None:
    """A 2-D ``(L, S)`` mask as ``(1, L, S)``, a 3-D one checked to be ``(N*H, L, S)``."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if tuple(mask.shape) != (tgt_len, src_len):
            raise ValueError(
                f"MultiheadAttention: the 2-D attn_mask is {list(mask.shape)}, but should be "
                f"{[tgt_len, src_len]} (target, source length)"
            )
        return mask.unsqueeze(0)  # (1, L, S)
    if tuple(mask.shape) != (batch_heads, tgt_len, src_len):
        raise ValueError(
            f"MultiheadAttention: the 3-D attn_mask is {list(mask.shape)}, but should be "
            f"{[batch_heads, tgt_len, src_len]} (batch * num_heads, target, source length)"
        )
    return mask


@register_qmodule(nn.MultiheadAttention)
class QMultiheadAttention(QParent, nn.MultiheadAttention):
    """nn.MultiheadAttention whose q/k/v and output projections are quantized layers.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    >>> q = QMultiheadAttention.from_float(mha, QuantSpec("int8", "per_channel"), None)
    >>> x = torch.randn(2, 5, 8)
    >>> out, weights = q(x, x, x)
    >>> out.shape, weights.shape, type(q.q_proj).__name__
    (torch.Size([2, 5, 8]), torch.Size([2, 5, 5]), 'QLinear')
    """

    q_proj: QLinear
    k_proj: QLinear
    v_proj: QLinear

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QParent:
        assert isinstance(module, nn.MultiheadAttention)
        label = name or type(module).__name__
        qmod = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",
        )
        out_proj, bias_k, bias_v = module.out_proj, module.bias_k, module.bias_v
        drop_parameters(qmod)
        qmod.notes = []
        qmod.out_proj = out_proj  # the float child: prepare() quantizes it as a Linear
        qmod.bias_k, qmod.bias_v = bias_k, bias_v  # float, in the projected space
        embed = module.embed_dim
        if module._qkv_same_embed_dim:
            assert module.in_proj_weight is not None
            weights = list(module.in_proj_weight.detach().chunk(3))
        else:
            weights = [
                getattr(module, f"{p}_weight").detach() for p in ("q_proj", "k_proj", "v_proj")
            ]
        biases = (
            list(module.in_proj_bias.detach().chunk(3))
            if module.in_proj_bias is not None
            else [None] * 3
        )
        grad = next(module.parameters()).requires_grad
        for proj, w, b in zip(_PROJECTIONS, weights, biases, strict=True):
            assert w.shape[0] == embed
            wp = nn.Parameter(w.clone(), requires_grad=grad)
            bp = nn.Parameter(b.clone(), requires_grad=grad) if b is not None else None
            qmod.add_module(proj, linear_child(wp, bp, weight, input, f"{label}.{proj}"))
        qmod.train(module.training)
        return qmod

    # --- the float parameter names, read from the children ---------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            children = self.__dict__.get("_modules", {})
            if not all(p in children for p in _PROJECTIONS):
                raise
            same = self.__dict__.get("_qkv_same_embed_dim", True)
            parts = [children[p] for p in _PROJECTIONS]
            if name == "in_proj_weight":
                return torch.cat([p.weight for p in parts]) if same else None
            if name == "in_proj_bias":
                biases = [p.bias for p in parts]
                return None if biases[0] is None else torch.cat(biases)
            if name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                return None if same else children[name.removesuffix("_weight")].weight
            raise

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a float MultiheadAttention's state_dict (pretrained weights into a prepared twin)
        for packed in ("in_proj_weight", "in_proj_bias"):
            value = state_dict.pop(prefix + packed, None)
            if value is not None:
                field = packed.removeprefix("in_proj_")
                for proj, part in zip(_PROJECTIONS, value.chunk(3), strict=True):
                    state_dict[f"{prefix}{proj}.{field}"] = part
        for proj in _PROJECTIONS:
            value = state_dict.pop(f"{prefix}{proj}_weight", None)
            if value is not None:
                state_dict[f"{prefix}{proj}.weight"] = value
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- forward -------------------------------------------------------------------------------
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float module's forward: same arguments, same outputs."""
        batched = _shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = _canonical_mask(
            key_padding_mask, "key_padding_mask", query.dtype, attn_mask
        )
        attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        if self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v through the quantized projections: ``(L, N, E)``, ``(S, N, E)`` twice."""
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"MultiheadAttention: key's sequence and batch dimensions {list(key.shape[:2])} "
                f"do not match value's {list(value.shape[:2])}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MultiheadAttention: expected query with embed_dim={self.embed_dim} features, "
                f"got {query.shape[-1]}"
            )
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` on batched ``(L, N, E)`` inputs with float
        masks, the projections replaced by the quantized children; per-head weights."""
        tgt_len, bsz, embed = query.shape
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint goes to scaled_dot_product_attention as is_causal
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        attn_mask = _check_attn_mask(attn_mask, tgt_len, key.shape[0], bsz * self.num_heads)
        q, k, v, attn_mask = self._heads(q, k, v, attn_mask, key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        heads, src_len, head_dim = self.num_heads, k.shape[1], embed // self.num_heads
        if need_weights:
            scores_q = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores_q, k.transpose(-2, -1))  # (N*H, L, S)
            else:
                scores = torch.bmm(scores_q, k.transpose(-2, -1))  # (N*H, L, S)
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            attn = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed)  # (L*N, E)
            out = self.out_proj(attn).view(tgt_len, bsz, -1)  # (L, N, E)
            return out, weights.view(bsz, heads, tgt_len, src_len)
        if attn_mask is not None:
            if attn_mask.shape[0] == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)  # (1, 1, L, S)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)  # (N, H, L or 1, S)
        attn = F.scaled_dot_product_attention(
            q.view(bsz, heads, tgt_len, head_dim),
            k.view(bsz, heads, src_len, head_dim),
            v.view(bsz, heads, src_len, head_dim),
            attn_mask,
            dropout_p,
            is_causal,
        )  # (N, H, L, D)
        attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed)  # (L*N, E)
        return self.out_proj(attn).view(tgt_len, bsz, -1), None  # (L, N, E)

    def _heads(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q, k, v split into heads ``(N*H, L or S, D)``, with ``bias_k``/``bias_v`` and the
        zero attention appended to k and v, and the key padding merged into the mask."""
        tgt_len, bsz, embed = q.shape
        heads = self.num_heads
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])  # (S+1, N, E)
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, embed // heads).transpose(0, 1)  # (N*H, L, D)
        k = k.reshape(k.shape[0], bsz * heads, embed // heads).transpose(0, 1)  # (N*H, S, D)
        v = v.reshape(v.shape[0], bsz * heads, embed // heads).transpose(0, 1)  # (N*H, S, D)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, embed // heads), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)  # (N*H, S+1, D)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        if key_padding_mask is None:
            return q, k, v, attn_mask
        src_len = k.shape[1]
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"MultiheadAttention: key_padding_mask is {list(key_padding_mask.shape)}, "
                f"expected {[bsz, src_len]} (batch, source length)"
            )
        padding = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, heads, -1, -1)
            .reshape(bsz * heads, 1, src_len)
        )  # (N*H, 1, S)
        return q, k, v, padding if attn_mask is None else attn_mask + padding
