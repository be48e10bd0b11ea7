"""Which layers cannot be swapped for their quantized twin without changing what they compute.

``prepare()`` replaces a registered float layer by a quantized twin that runs the registered
float class's computation. That would silently lose the user's own code when the layer is

- a subclass overriding ``forward`` (or another method the computation relies on, such as
  ``_conv_forward``), or an instance whose ``forward`` was replaced;
- parametrized (``torch.nn.utils.parametrize``, ``parametrizations.weight_norm``,
  ``spectral_norm``): its weight is recomputed from other tensors on every call;
- hooked: forward (pre-)hooks (the old-style ``torch.nn.utils.weight_norm`` rebuilds the weight
  from ``weight_g`` and ``weight_v`` in one) or backward hooks that the twin would not run;
- set up in a way the twin cannot reproduce (an Embedding with ``max_norm``).

Such layers stay in float and ``PreparedInfo.kept_float`` says why.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lowbit.nn.module import QMODULES, QModule, qmodule_class

__all__ = ["unswappable_reason", "unswappable_layers"]

_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)


def _hook_name(hook: Any) -> str:
    name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{getattr(hook, '__module__', None) or type(hook).__module__}.{name}"


# torch's hooks that rebuild a weight before every call -> what they do and how to undo them
_WEIGHT_HOOKS: tuple[tuple[type, str], ...] = (
    (
        WeightNorm,
        "torch.nn.utils.weight_norm recomputes its weight from weight_g and weight_v before "
        "every call (a forward pre-hook); torch.nn.utils.remove_weight_norm(layer) first",
    ),
    (
        SpectralNorm,
        "torch.nn.utils.spectral_norm recomputes its weight before every call (a forward "
        "pre-hook); torch.nn.utils.remove_spectral_norm(layer) first",
    ),
    (
        BasePruningMethod,
        "torch.nn.utils.prune masks its weight before every call (a forward pre-hook); "
        "make the pruning permanent with prune.remove(layer, 'weight') first",
    ),
)


def _hook_reason(module: nn.Module) -> str | None:
    for attr, what in _HOOKS:
        hooks = getattr(module, attr, None) or {}
        for hook in hooks.values():
            known = next((why for cls, why in _WEIGHT_HOOKS if isinstance(hook, cls)), None)
            if known is not None:
                return known
            return (
                f"a {what} ({_hook_name(hook)}) is registered on it, which its quantized "
                "twin would not run; remove the hook before prepare() to quantize it"
            )
    return None


def _parametrized_reason(module: nn.Module) -> str | None:
    if not parametrize.is_parametrized(module):
        return None
    found = cast(nn.ModuleDict, module.parametrizations)
    names = sorted(found.keys())
    kinds = sorted({type(p).__name__ for n in names for p in cast(nn.ModuleList, found[n])})
    return (
        f"its {', '.join(names)} is parametrized ({', '.join(kinds)}, torch.nn.utils."
        "parametrize): recomputed from other tensors on every call; remove the "
        "parametrization (parametrize.remove_parametrizations) before prepare() to quantize it"
    )


def _override_reason(module: nn.Module, methods: tuple[str, ...]) -> str | None:
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in QMODULES), None)
    if base is None:
        return None
    for name in methods:
        if name in module.__dict__:
            return (
                f"its {name} was replaced on the instance; its quantized twin would run "
                f"{base.__name__}.{name} instead"
            )
        if getattr(cls, name, None) is not getattr(base, name, None):
            owner = next(c for c in cls.__mro__ if name in c.__dict__)
            return (
                f"{owner.__name__} overrides {base.__name__}.{name}(); its quantized twin "
                f"would compute {base.__name__}'s {name} instead, so it stays float"
            )
    return None


def unswappable_reason(module: nn.Module) -> str | None:
    """Why ``module`` (a layer of a registered class) must stay in float, or None when its
    quantized twin computes the same thing.

    >>> class Doubled(nn.Linear):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> unswappable_reason(Doubled(2, 2))[:34]
    'Doubled overrides Linear.forward()'
    >>> unswappable_reason(nn.Linear(2, 2)) is None
    True
    """
    qcls = qmodule_class(module)
    if qcls is None:
        return None
    reason = _parametrized_reason(module) or _hook_reason(module)
    if not issubclass(qcls, QModule):  # a twin made of child layers (LSTM, attention)
        return reason or _override_reason(module, ("forward",))
    weight = module._parameters.get("weight")
    if reason is None and not isinstance(weight, nn.Parameter):
        reason = "its weight is not a parameter of its own (it is computed or set elsewhere)"
    return reason or _override_reason(module, qcls.float_methods) or qcls.float_unsupported(module)


def unswappable_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> why, for every layer of ``model`` that must stay in float because of
    what it is (its class, parametrizations, hooks), whatever the recipe says.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.utils.parametrizations.weight_norm(nn.Linear(2, 2)))
    >>> list(unswappable_layers(net))
    ['1']
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        reason = unswappable_reason(module)
        if reason is not None:
            found[name] = reason
    return found
