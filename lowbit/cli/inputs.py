"""What the command line names: the user's modules (``--model``, ``--data``), weight files and
output paths; every problem with them becomes a :class:`UsageError` naming the fix."""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.export.hf import HF_PREFIX, HFError, load_pretrained

__all__ = [
    "UsageError",
    "import_object",
    "load_state_dict_file",
    "os_error_message",
    "check_output_path",
    "build_model",
    "build_data",
    "write_error",
    "first_line",
]


class UsageError(Exception):
    """A mistake on the command line; printed as one line, exit status 2."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none.

    >>> first_line(ValueError("bad header")), first_line(EOFError())
    ('bad header', 'EOFError')
    """
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_OS_FIXES = {
    errno.ENOSPC: "no space left on the disk; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EACCES: "permission denied; use a path you may use or fix its permissions",
    errno.EPERM: "operation not permitted; use a path you may use or fix its permissions",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.ENAMETOOLONG: "the name is too long; use a shorter path",
}


def os_error_message(err: OSError, what: str = "") -> str:
    """One line naming the file, the problem and the fix for an ``OSError``.

    >>> os_error_message(OSError(errno.ENOSPC, "No space left on device", "m.lowbit"), "--out")
    "--out 'm.lowbit': no space left on the disk; free some space or write to another disk"
    """
    fix = _OS_FIXES.get(err.errno or 0, f"{err.strerror or err}; check the path and try again")
    name = f" {str(err.filename)!r}" if err.filename is not None else ""
    return f"{what}{name}: {fix}".lstrip()


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """Fail before any work when ``path`` cannot be written: its folder is missing, is a file
    or is read-only to us, or ``path`` itself is a folder.

    >>> check_output_path("m.lowbit").name
    'm.lowbit'
    >>> check_output_path("/no/such/folder/m.lowbit")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lowbit.cli.inputs.UsageError: --out '/no/such/folder/m.lowbit': the folder ...
    """
    path = Path(path)
    here = f"{flag} {str(path)!r}"
    if path.is_dir():
        raise UsageError(f"{here} is a folder; give a file name such as {path / 'model.lowbit'}")
    folder = path.parent
    if not folder.exists():
        blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise UsageError(f"{here}: {str(blocking)!r} is a file, not a folder; fix the path")
        raise UsageError(
            f"{here}: the folder {str(folder)!r} does not exist; create it first "
            f"(mkdir -p {folder})"
        )
    if not folder.is_dir():
        raise UsageError(f"{here}: {str(folder)!r} is a file, not a folder; fix the path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"{here}: no permission to write in {str(folder)!r}; choose a folder you can write"
        )
    return path


def _import_from(module_name: str, folder: Path) -> Any:
    """Import ``module_name``, its top-level package taken from ``folder`` when it is there
    (so the user's own module wins for its own name), installed packages for everything else."""
    top = module_name.partition(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[top]
                raise
    return importlib.import_module(module_name)


def import_object(spec: str, app_dir: str | Path = ".") -> Any:
    """Import ``"package.module:attr"`` (uvicorn style) and return the attribute.

    ``app_dir`` (``--app-dir``) is where the user's module lives; it is appended to
    ``sys.path``, after the installed packages, so that a file there named like an installed
    package cannot shadow it, while the user's module and its siblings still import.

    >>> import_object("lowbit.data.zoo:MLP").__name__
    'MLP'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:NAME (for example mypkg.models:create_model)")
    folder = Path(app_dir).resolve()
    if not folder.is_dir():
        raise UsageError(f"--app-dir {str(app_dir)!r} is not a folder; give the folder of {spec}")
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    try:
        module = _import_from(module_name, folder)
    except ImportError as err:
        raise UsageError(
            f"cannot import module {module_name!r} from {spec!r}: {err} (looked in the "
            f"installed packages and in --app-dir {str(folder)!r})"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a float state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    >>> load_state_dict_file("missing.pt")
    Traceback (most recent call last):
    ...
    lowbit.cli.inputs.UsageError: weights file 'missing.pt' does not exist
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"weights {str(path)!r} is a folder; give the state-dict file in it")
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    try:
        path.open("rb").close()
    except OSError as err:
        raise UsageError(os_error_message(err, "cannot read weights")) from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UsageError(
                f"cannot read weights {str(path)!r} ({first_line(err)}): the file is "
                "truncated, corrupt or not safetensors; save it again with "
                "safetensors.torch.save_file(model.state_dict(), ...)"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign files
        raise UsageError(
            f"cannot read weights {str(path)!r} safely ({first_line(err)}); save a "
            "state_dict with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    if not isinstance(state, dict):
        raise UsageError(f"weights file {str(path)!r} holds no state dict")
    return state


def build_model(factory: str, weights: str | None, app_dir: str = ".") -> nn.Module:
    """The float model ``--model`` names: ``MOD:FACTORY`` (with ``--weights``, a state dict
    file) or ``hf:DIR``, a transformers checkpoint folder from ``save_pretrained``."""
    if factory.startswith(HF_PREFIX):
        if weights:
            raise UsageError(
                f"--model {factory!r} brings its own weights; drop --weights (or give MOD:FACTORY)"
            )
        try:
            return load_pretrained(factory[len(HF_PREFIX) :])
        except HFError as err:
            raise UsageError(str(err)) from None
    make = import_object(factory, app_dir)
    try:
        model = make() if callable(make) and not isinstance(make, nn.Module) else make
    except TypeError as err:
        raise UsageError(f"{factory!r} must be callable with no arguments ({err})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{factory!r} returned {type(model).__name__}, not a torch nn.Module")
    if weights:
        try:
            result = model.load_state_dict(load_state_dict_file(weights), strict=False)
        except RuntimeError as err:  # torch lists every size mismatch on its own line
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            raise UsageError(
                f"weights {weights!r} do not fit {type(model).__name__}: "
                f"{details[0] if details else err}"
                + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise UsageError(
                f"weights {weights!r} do not fit {type(model).__name__}: missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    return model.eval()


def build_data(spec: str, app_dir: str = ".") -> list[Any]:
    make = import_object(spec, app_dir)
    data = make() if callable(make) else make
    if not hasattr(data, "__iter__"):
        raise UsageError(f"{spec!r} gave {type(data).__name__}, not an iterable of batches")
    return list(data) if not isinstance(data, list) else data


def write_error(err: Exception, flag: str, path: str) -> UsageError:
    """A failed write (an OSError, or safetensors' own error wrapping one) as one line."""
    if isinstance(err, OSError):
        if err.filename is None:
            err.filename = path
        return UsageError(os_error_message(err, flag))
    code = re.search(r"code: (\d+)", str(err))  # safetensors: IoError(Os { code: 28, ... })
    if code is not None:
        return UsageError(os_error_message(OSError(int(code.group(1)), str(err), path), flag))
    return UsageError(f"{flag} {path!r}: writing failed ({first_line(err)})")
