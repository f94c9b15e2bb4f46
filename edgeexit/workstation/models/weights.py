"""The weights of a network of one's own (``edgeexit convert FILE.py:NAME --weights FILE``): a state_dict file,
loaded with ``weights_only=True``; a pickled whole model only when the caller trusts it (unpickling runs code)."""

from __future__ import annotations

import os
import re
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from edgeexit.errors import CheckpointError, clip

from .zoo import check_state_dict


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: Prefixes wrappers put before every key: nn.DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def printable(text: str) -> str:
    """``text`` without terminal colour codes, control characters escaped (one line, safe to print)."""
    text = _ANSI.sub("", str(text))
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _pickle_module(namespace: Mapping[str, Any]) -> types.ModuleType:
    """A pickle module whose Unpickler also finds classes by name in ``namespace`` (the network file's names:
    a model pickled by a script refers to ``__main__.Net``)."""
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                if name in namespace:
                    return namespace[name]
                raise

    mod = types.ModuleType("edgeexit_trusted_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.__dict__.update(Pickler=pickle.Pickler, dump=pickle.dump)
    return mod


def _read_weights(path: Path, trust_pickle: bool, namespace: Mapping[str, Any]) -> Any:
    import pickle

    shown = printable(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(printable(str(exc)))
        if not trust_pickle:
            what = f" (it names {found.group(1)})" if found else ""
            raise CheckpointError(f"weights file {shown} holds pickled Python objects{what}, e.g. a whole model saved "
                                  "with torch.save(model), not only tensors; loading it runs code stored in the file: "
                                  "if you trust the file, pass --trust-pickle (trust_pickle=True), or save the weights "
                                  "where the model is defined with torch.save(model.state_dict(), 'weights.pt') and "
                                  "give that file") from None
    except Exception as exc:  # torch raises many types for corrupt or non-weight files
        raise CheckpointError(f"cannot read weights file {shown} ({type(exc).__name__}: "
                              f"{clip(printable(str(exc)), 120)}); expected a torch.save(model.state_dict()) "
                              "file") from None
    try:  # trusted: the file may run code
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_pickle_module(namespace))
    except Exception as exc:  # the pickled objects' own code, missing classes: any error
        raise CheckpointError(f"cannot unpickle weights file {shown} ({type(exc).__name__}: "
                              f"{clip(printable(str(exc)), 160)}); the classes it was saved with must be importable "
                              "or defined in the network file; or save torch.save(model.state_dict(), 'weights.pt') "
                              "where the model is defined") from None


def _state_dict_in(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded weights file: bare, a whole module, or under "state_dict" / "model_state_dict" /
    "model" (a dict or a module)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), (dict, torch.nn.Module)):
                obj = obj[key]
                break
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{printable(str(path))} does not hold a state_dict (got {type(obj).__name__}); save "
                              "weights with torch.save(model.state_dict(), path)")
    return {str(k): v for k, v in obj.items()}


def match_prefixes(state: dict[str, torch.Tensor], own: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` with wrapper prefixes (``module.``, ``_orig_mod.``) removed only where that makes its keys the
    network's own ``own``: a network whose own attribute is called ``module`` keeps its keys."""
    want = set(own)
    best = state
    todo = [state]
    while todo:
        cand = todo.pop()
        if set(cand) == want:
            return cand
        if len(want & set(cand)) > len(want & set(best)):
            best = cand
        for prefix in WRAPPER_PREFIXES:
            if cand and all(k.startswith(prefix) for k in cand):
                todo.append({k[len(prefix):]: v for k, v in cand.items()})
    return best


def load_weights_file(module: torch.nn.Module, path: str | os.PathLike, trust_pickle: bool = False,
                      namespace: Mapping[str, Any] | None = None) -> None:
    """Load the weights in ``path`` into ``module`` strictly (every key, every shape).

    Args:
        module: the network, built.
        path: ``torch.save(model.state_dict(), path)`` (bare, or under "state_dict" / "model_state_dict" /
            "model"); a whole pickled model only with ``trust_pickle``.
        trust_pickle: allow files holding pickled Python objects (``torch.save(model)``): unpickling runs code
            named in the file, so only for files one trusts.
        namespace: names the pickled classes may be found under besides their modules (the network file's).

    Raises:
        CheckpointError: a missing or unreadable file, pickled objects without ``trust_pickle``, or weights that
            do not fit (one line each).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {printable(str(path))} does not exist; pass the path of a "
                              "torch.save(model.state_dict()) file")
    state = _state_dict_in(_read_weights(path, trust_pickle, namespace or {}), path)
    state = match_prefixes(state, list(module.state_dict()))
    check_state_dict(module, state, printable(str(path)))
    module.load_state_dict(state, strict=True)
