"""Which layers cannot be swapped for their quantized twin without changing what they compute.

``prepare()`` replaces a registered float layer by a quantized twin that runs the registered
float class's computation. That would silently lose the user's own code when the layer is

- a subclass overriding ``forward`` without calling ``super().forward`` (or overriding another
  method the computation relies on, such as ``_conv_forward``), or an instance whose
  ``forward`` was replaced (a subclass whose ``forward`` extends ``super().forward`` gets a
  twin that runs its ``forward`` in front of the quantized one: :func:`twin_class`);
- parametrized (``torch.nn.utils.parametrize``, ``spectral_norm``): its weight is recomputed
  from other tensors on every call (weight normalisation alone is folded into the plain
  weight inference uses, :func:`fold_weight_norm`, and the layer quantized);
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

__all__ = [
    "unswappable_reason",
    "unswappable_layers",
    "fold_weight_norm",
    "twin_class",
    "adopt_subclass",
]

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


def _extends_forward(cls: type, base: type) -> bool:
    """Whether ``cls`` overrides only ``forward`` of the registered ``base`` and its forward
    calls ``super().forward`` (``BartScaledWordEmbedding``: the lookup times a scale): then a
    twin that puts ``cls``'s forward in front of the quantized one computes the same thing."""
    owners = [c for c in cls.__mro__[: cls.__mro__.index(base)] if "forward" in c.__dict__]
    if len(owners) != 1:
        return False
    code = getattr(owners[0].__dict__["forward"], "__code__", None)
    return code is not None and "super" in code.co_names and "forward" in code.co_names


def _override_reason(
    module: nn.Module, methods: tuple[str, ...], extendable: bool = True
) -> str | None:
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in QMODULES), None)
    if base is None:
        return None
    for name in methods:
        if (
            extendable
            and name == "forward"
            and "forward" not in module.__dict__
            and _extends_forward(cls, base)
        ):
            continue  # twin_class() keeps this forward in front of the quantized one
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
    ...         return 2 * x @ self.weight.t()
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
        return reason or _override_reason(module, ("forward",), extendable=False)
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


_TWINS: dict[tuple[type, type], type] = {}


def twin_class(module: nn.Module, qcls: type[QModule]) -> type[QModule]:
    """The class to quantize ``module`` with: ``qcls``, or for a subclass whose ``forward``
    extends the registered one (calls ``super().forward``) a class with that ``forward`` in
    front of ``qcls``'s, made once per subclass.

    >>> from lowbit.nn import QEmbedding
    >>> class Scaled(nn.Embedding):
    ...     def forward(self, ids):
    ...         return super().forward(ids) * 2.0
    >>> twin_class(Scaled(4, 2), QEmbedding).__mro__[1:3] == (Scaled, QEmbedding)
    True
    """
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in QMODULES), None)
    if base is None or cls is base or not _extends_forward(cls, base):
        return qcls
    key = (cls, qcls)
    if key not in _TWINS:
        _TWINS[key] = type(f"Q{cls.__name__}", (cls, qcls), {"__module__": qcls.__module__})
    return cast("type[QModule]", _TWINS[key])


def adopt_subclass(qmod: QModule, module: nn.Module, cls: type[QModule]) -> QModule:
    """Give the twin ``qmod`` (built by ``qcls.from_float``) the class :func:`twin_class` made
    and the plain attributes the subclass added (``embed_scale``, ...)."""
    if type(qmod) is cls:
        return qmod
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in vars(qmod):
            setattr(qmod, key, value)
    qmod.__class__ = cls
    return qmod


def fold_weight_norm(model: nn.Module) -> dict[str, str]:
    """Replace weight normalisation on registered layers (``parametrizations.weight_norm`` or
    the old ``torch.nn.utils.weight_norm`` hook) by the plain weight it computes, the weight
    inference uses, so the layer can be quantized; returns name -> what was done.

    >>> conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3))
    >>> net = nn.Sequential(conv)
    >>> list(fold_weight_norm(net)), type(net[0]).__name__
    (['0'], 'Conv1d')
    """
    folded: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if qmodule_class(module) is None:
            continue
        if parametrize.is_parametrized(module, "weight"):
            plist = cast(nn.ModuleDict, module.parametrizations)["weight"]
            kinds = {type(p).__name__ for p in cast(nn.ModuleList, plist)}
            others = set(cast(nn.ModuleDict, module.parametrizations).keys()) - {"weight"}
            if kinds == {"_WeightNorm"} and not others:
                # torch deletes the weight property from the parametrized class, which a deep
                # copy shares with the user's model: give this module a class of its own first
                cls = type(module)
                own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
                module.__class__ = type(cls.__name__, cls.__bases__, own)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
                folded[name] = "weight_norm folded into a plain weight (the inference weight)"
            continue
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                nn.utils.remove_weight_norm(module, hook.name)
                folded[name] = "weight_norm folded into a plain weight (the inference weight)"
    return folded
