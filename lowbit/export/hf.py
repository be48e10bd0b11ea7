"""transformers models as files know them: load a local checkpoint folder, describe a model so a
``.lowbit`` file can rebuild it, and rebuild it from that description.

Everything goes through transformers' own classes, named by the checkpoint's config
(``architectures``) and looked up in the ``transformers`` namespace: no remote code is ever run
(``trust_remote_code`` stays False) and no pickle is read (only ``*.safetensors`` weights).
transformers is imported on first use, never when lowbit is imported.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "HF_PREFIX",
    "HFError",
    "is_transformers_model",
    "load_pretrained",
    "model_source",
    "build_from_source",
    "check_config_sizes",
    "params_on_meta",
]

HF_PREFIX = "hf:"
_LIBRARY = "transformers"
_MAX_CONFIG_CHARS = 1 << 20  # a config is a few KiB; a crafted header gets no further


class HFError(ValueError):
    """A transformers checkpoint folder or a stored model description lowbit cannot use."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in the dev extras
        raise HFError("this needs the transformers package: pip install transformers") from None
    return transformers


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked without importing it).

    >>> is_transformers_model(nn.Linear(2, 2))
    False
    """
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def _model_class(name: Any, where: str) -> Any:
    """The transformers model class called ``name``: a plain class of the transformers
    namespace that is a PreTrainedModel, never a class from remote code."""
    transformers = _transformers()
    if not isinstance(name, str) or not name.isidentifier():
        raise HFError(f"{where}: the architecture must be a class name, got {name!r}")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise HFError(
            f"{where}: {name!r} is not a model class of transformers {transformers.__version__}; "
            "use a transformers version that has it (lowbit never runs remote code)"
        )
    return cls


def load_pretrained(folder: str | Path) -> nn.Module:
    """The float model saved with ``save_pretrained`` in ``folder`` (config.json + safetensors),
    built by the class its config names, in eval mode; tied weights are tied as saved.

    >>> import tempfile, transformers
    >>> cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    ...     model = load_pretrained(d)
    >>> type(model).__name__, model.training
    ('GPT2LMHeadModel', False)
    """
    transformers = _transformers()
    path = Path(folder)
    where = f"hf:{folder}"
    if not (path / "config.json").is_file():
        raise HFError(
            f"{where}: no config.json in that folder; give a folder written by "
            "model.save_pretrained(folder)"
        )
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (it holds {pickled[0]}, a pickle lowbit will not load)" if pickled else ""
        raise HFError(
            f"{where}: no *.safetensors weights{hint}; re-save the model with "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as err:
        raise HFError(f"{where}: config.json cannot be read ({err})") from None
    names = getattr(config, "architectures", None) or []
    cls = _model_class(names[0], where) if names else transformers.AutoModel
    try:
        model = cls.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise HFError(f"{where}: the checkpoint cannot be loaded ({err})") from None
    assert isinstance(model, nn.Module)
    return model.eval()


def model_source(model: nn.Module) -> dict[str, Any] | None:
    """What a file needs to rebuild ``model`` without the user's code: the transformers class
    name and its config as JSON; None for a model that is not a transformers model.

    >>> import transformers
    >>> cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                               intermediate_size=64, vocab_size=64)
    >>> source = model_source(transformers.BertModel(cfg))
    >>> source["library"], source["architecture"], source["config"]["hidden_size"]
    ('transformers', 'BertModel', 32)
    >>> model_source(nn.Linear(2, 2)) is None
    True
    """
    if not is_transformers_model(model):
        return None
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return {
        "library": _LIBRARY,
        "architecture": type(model).__name__,
        "version": _transformers().__version__,
        "config": json.loads(config.to_json_string(use_diff=False)),
    }


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (nothing allocated for what a
    file will provide) and their buffers as usual (computed constants such as rotary
    frequencies keep their values).

    >>> with params_on_meta():
    ...     layer = nn.BatchNorm1d(4)
    >>> layer.weight.device.type, layer.running_mean.device.type
    ('meta', 'cpu')
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


_LAYER_COUNT_KEYS = ("layers", "n_layer", "num_blocks", "depths")


def check_config_sizes(config: Any, elements: int, tensors: int, where: str = "file") -> None:
    """Refuse a stored config whose numbers would build something far bigger than the file
    holds: no integer may exceed the file's element count (at least 2**20), and no layer count
    its number of tensors (a real model stores at least one tensor per layer). A crafted
    config (``max_position_embeddings: 50000000``) is refused before anything is built.

    >>> check_config_sizes({"hidden_size": 64, "num_hidden_layers": 2}, 10_000, 40)
    >>> try:
    ...     check_config_sizes({"num_hidden_layers": 10_000}, 10_000, 40)
    ... except HFError as err:
    ...     print(str(err)[:60])
    file: config num_hidden_layers = 10000 is more layers than t
    """
    limit = max(elements, 1 << 20)

    def visit(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, str(k))
        elif isinstance(value, list):
            for v in value:
                visit(v, key)
        elif isinstance(value, int) and not isinstance(value, bool):
            if any(word in key for word in _LAYER_COUNT_KEYS) and value > tensors:
                raise HFError(
                    f"{where}: config {key} = {value} is more layers than the file has "
                    f"tensors ({tensors}); the file is crafted or damaged, re-save the model"
                )
            if abs(value) > limit:
                raise HFError(
                    f"{where}: config {key} = {value} is larger than everything the file "
                    f"holds ({elements} values); the file is crafted or damaged, re-save the model"
                )

    visit(config, "config")


def build_from_source(
    source: Any, where: str = "file", budget: tuple[int, int] | None = None
) -> nn.Module:
    """An untrained skeleton (parameters on the meta device) of the model ``source`` describes
    (:func:`model_source`), built by transformers from the stored config; eval mode.
    ``budget``: the file's (element count, tensor count), which bound the config's numbers
    (:func:`check_config_sizes`) before anything is built.

    >>> import transformers
    >>> cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
    ...                               intermediate_size=64, vocab_size=64)
    >>> skeleton = build_from_source(model_source(transformers.BertModel(cfg)))
    >>> type(skeleton).__name__, skeleton.embeddings.word_embeddings.weight.device.type
    ('BertModel', 'meta')
    """
    if not isinstance(source, dict) or source.get("library") != _LIBRARY:
        raise HFError(
            f"{where}: the stored model description is not a transformers one; pass the float "
            "model to lowbit.load(path, model)"
        )
    cls = _model_class(source.get("architecture"), where)
    config_dict = source.get("config")
    if not isinstance(config_dict, dict) or len(json.dumps(config_dict)) > _MAX_CONFIG_CHARS:
        raise HFError(f"{where}: the stored transformers config is missing or too large")
    if config_dict.get("auto_map"):
        raise HFError(
            f"{where}: the stored config asks for remote code (auto_map), which lowbit never "
            "runs; pass the float model to lowbit.load(path, model)"
        )
    if budget is not None:
        check_config_sizes(config_dict, *budget, where=where)
    try:
        config = cls.config_class.from_dict(dict(config_dict))
        transformers = _transformers()
        no_init = getattr(getattr(transformers, "initialization", None), "no_init_weights", None)
        guard = no_init() if no_init is not None else contextlib.nullcontext()
        with params_on_meta(), guard:
            model = cls(config)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise HFError(
            f"{where}: transformers cannot build {cls.__name__} from the stored config ({err})"
        ) from None
    assert isinstance(model, nn.Module)
    return model.eval()
