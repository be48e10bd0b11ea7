"""Float parents that do not call their children's ``forward``, and what prepare() does about it.

Some torch modules read a child layer's ``weight`` directly instead of calling the child:
``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional kernel. Such a parent
gets a quantized twin that calls its children (:class:`~lowbit.nn.attention.QMultiheadAttention`);
only when the parent itself stays float (a recipe rule keeps it) must its children stay float
too, or a quantized ``out_proj`` would be skipped. Others have a fused inference path that
bypasses their children only in eval mode without gradients (``nn.TransformerEncoderLayer``):
that path is switched off for the one layer, so its quantized children really run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lowbit.nn.module import qmodule_class
from lowbit.nn.parent import QParent

__all__ = ["FLOAT_CHILDREN", "FUSED_PATHS", "kept_float_by_parent", "disable_fused_path"]

# parent type -> why its quantizable children must stay in float while the parent is float
FLOAT_CHILDREN: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "its nn.MultiheadAttention stays float and reads out_proj.weight directly instead of "
        "calling out_proj"
    ),
}


def _no_encoder_fast_path(layer: nn.Module) -> None:
    # torch takes the fused path only when this flag is truthy (1 relu, 2 gelu); the regular
    # path reads self.activation, so 0 changes nothing but the choice of path.
    setattr(layer, "activation_relu_or_gelu", 0)  # noqa: B010  # an int attribute, not a Module


def _no_nested_tensors(encoder: nn.Module) -> None:
    # with a key padding mask in eval mode, nn.TransformerEncoder packs its input into a
    # nested tensor for its layers' fused path; the quantized layers take dense tensors
    setattr(encoder, "use_nested_tensor", False)  # noqa: B010  # a bool, not a Module


# parent type -> how to make it call its children in every mode
FUSED_PATHS: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    nn.TransformerEncoderLayer: _no_encoder_fast_path,
    nn.TransformerEncoder: _no_nested_tensors,
}


def kept_float_by_parent(
    model: nn.Module, swapped: Callable[[str, nn.Module], bool] | None = None
) -> dict[str, str]:
    """Qualified names of layers that must stay in float because of their parent -> why.

    A parent that ``swapped(name, parent)`` says will become its quantized twin (by default:
    any parent lowbit has a twin for) calls its children, so they are not held back.

    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(8, 2)
    >>> kept_float_by_parent(torch.nn.Sequential(mha))
    {}
    >>> list(kept_float_by_parent(torch.nn.Sequential(mha), lambda name, parent: False))
    ['0.out_proj']
    """
    if swapped is None:

        def swapped(name: str, parent: nn.Module) -> bool:
            return qmodule_class(parent) is not None

    kept: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        reason = next((r for t, r in FLOAT_CHILDREN.items() if isinstance(parent, t)), None)
        if reason is None or isinstance(parent, QParent) or swapped(parent_name, parent):
            continue
        prefix = f"{parent_name}." if parent_name else ""
        for child_name, _ in parent.named_modules():
            if child_name:
                kept[prefix + child_name] = reason
    return kept


def disable_fused_path(model: nn.Module, quantized: set[str]) -> list[str]:
    """Switch off fused inference paths of parents holding a quantized layer; returns notes.

    >>> import torch
    >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    >>> disable_fused_path(torch.nn.Sequential(layer), {"0.linear1"})
    ['0: fused fast path off so its quantized layers run']
    """
    notes = []
    for name, module in model.named_modules():
        switch = next((f for t, f in FUSED_PATHS.items() if isinstance(module, t)), None)
        prefix = f"{name}." if name else ""
        if switch is not None and any(q.startswith(prefix) for q in quantized):
            switch(module)
            notes.append(
                f"{name or type(module).__name__}: fused fast path off so its quantized layers run"
            )
    return notes
