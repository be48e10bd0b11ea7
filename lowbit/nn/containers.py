"""Float parents that do not call their children's ``forward``, and what prepare() does about it.

Some torch modules read a child layer's ``weight`` directly instead of calling the child:
``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional kernel, so a quantized
``out_proj`` would be skipped (and, once converted, missing its float weight). Those children
stay in float. Others have a fused inference path that bypasses their children only in eval
mode without gradients (``nn.TransformerEncoderLayer``): that path is switched off for the one
layer, so its quantized children really run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["FLOAT_CHILDREN", "FUSED_PATHS", "kept_float_by_parent", "disable_fused_path"]

# parent type -> why its quantizable children must stay in float
FLOAT_CHILDREN: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj"
    ),
}


def _no_encoder_fast_path(layer: nn.Module) -> None:
    # torch takes the fused path only when this flag is truthy (1 relu, 2 gelu); the regular
    # path reads self.activation, so 0 changes nothing but the choice of path.
    setattr(layer, "activation_relu_or_gelu", 0)  # noqa: B010  # an int attribute, not a Module


# parent type -> how to make it call its children in every mode
FUSED_PATHS: dict[type[nn.Module], Callable[[nn.Module], None]] = {
    nn.TransformerEncoderLayer: _no_encoder_fast_path,
}


def kept_float_by_parent(model: nn.Module) -> dict[str, str]:
    """Qualified names of layers that must stay in float because of their parent -> why.

    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(8, 2)
    >>> list(kept_float_by_parent(torch.nn.Sequential(mha)))
    ['0.out_proj']
    """
    kept: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        reason = next((r for t, r in FLOAT_CHILDREN.items() if isinstance(parent, t)), None)
        if reason is None:
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
