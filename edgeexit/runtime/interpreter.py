"""Choosing and creating a TFLite interpreter: ai-edge-litert, tflite-runtime or tensorflow.lite.

The three packages expose the same ``Interpreter`` class. They are tried in this order by
``backend="auto"``:

* ``ai-edge-litert``  -- ``ai_edge_litert.interpreter`` (x86-64, aarch64 / 64-bit Raspberry Pi OS);
* ``tflite-runtime``  -- ``tflite_runtime.interpreter`` (the legacy runtime; the only one with wheels for
  32-bit armv7 Raspberry Pi OS; needs numpy<2);
* ``tensorflow``      -- ``tensorflow.lite`` (a workstation with full TensorFlow; heavy, never preferred).

Only APIs that tflite-runtime 2.14 also has are used: ``Interpreter(model_content, num_threads,
experimental_delegates)``, ``allocate_tensors``, ``get_input_details``, ``get_output_details``,
``tensor``, ``invoke`` and ``load_delegate``, plus the native ``Invoke`` behind ``invoke`` (see
:func:`native_invoke`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..errors import BundleError, InterpreterError, UsageError, printable
from .files import read_regular
from .tflite import MAX_FILE_BYTES, Model, read_model

log = logging.getLogger(__name__)

#: backend name -> module that provides ``Interpreter`` and ``load_delegate``, in "auto" order.
BACKENDS: dict[str, str] = {
    "ai-edge-litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}
#: Most interpreter threads accepted (the interpreter's own limit is a C int; no board has more cores).
MAX_THREADS = 256
#: Shared library of the Edge TPU runtime (libedgetpu1-std / -max Debian packages) on Linux.
EDGETPU_LIBRARY = "libedgetpu.so.1"

INSTALL_HINT = ("pip install ai-edge-litert (64-bit Raspberry Pi OS, x86-64 Linux, macOS) or "
                "pip install tflite-runtime 'numpy<2' (32-bit armv7 Raspberry Pi OS, which has no "
                "ai-edge-litert wheels)")


@dataclass(frozen=True)
class Backend:
    """An importable interpreter implementation."""

    name: str                                  # one of BACKENDS
    version: str                               # package version, "unknown" if it does not say
    interpreter_class: Callable[..., Any]      # the Interpreter class
    load_delegate: Callable[..., Any] | None   # load_delegate(library, options) or None


def _import_backend(name: str) -> Backend:
    module_name = BACKENDS[name]
    module = importlib.import_module(module_name)  # ImportError handled by the caller
    if name == "tensorflow":
        interp_cls, delegate = module.Interpreter, getattr(module.experimental, "load_delegate", None)
        top = importlib.import_module("tensorflow")
    else:
        interp_cls, delegate = module.Interpreter, getattr(module, "load_delegate", None)
        top = importlib.import_module(module_name.split(".")[0])
    version = str(getattr(top, "__version__", "unknown"))
    return Backend(name=name, version=version, interpreter_class=interp_cls, load_delegate=delegate)


def resolve_backend(backend: str = "auto") -> Backend:
    """Import the interpreter package named by ``backend``, or the first importable one for "auto".

    Args:
        backend: "auto", "ai-edge-litert", "tflite-runtime" or "tensorflow".

    Returns:
        The :class:`Backend`.

    Raises:
        UsageError: an unknown backend name.
        InterpreterError: the requested package (or, for "auto", every package) cannot be imported.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise UsageError(f"unknown interpreter backend {backend!r}; expected auto, {', '.join(BACKENDS)}")
    names = list(BACKENDS) if backend == "auto" else [backend]
    failures = []
    for name in names:
        try:
            found = _import_backend(name)
        except ImportError as exc:
            # tflite-runtime built against numpy 1 raises ImportError('numpy.core.multiarray failed ...')
            failures.append(f"{name}: {exc}".replace("\n", " "))
            continue
        log.debug("interpreter backend %s %s", found.name, found.version)
        return found
    if backend == "auto":
        raise InterpreterError(f"no TFLite interpreter is installed; {INSTALL_HINT}")
    raise InterpreterError(f"interpreter backend {backend!r} cannot be imported ({failures[0]:.160}); "
                           f"install it or use --backend auto; {INSTALL_HINT}")


def edgetpu_delegate(backend: Backend, library: str = EDGETPU_LIBRARY) -> Any:
    """Load the Edge TPU delegate.

    Raises:
        InterpreterError: the backend cannot load delegates, the Edge TPU runtime library is not
            installed, or no Edge TPU device is attached.
    """
    if backend.load_delegate is None:
        raise InterpreterError(f"interpreter backend {backend.name} cannot load delegates; use ai-edge-litert "
                               "or tflite-runtime for the Edge TPU")
    try:
        # Load the library ourselves first: when the interpreter's Delegate class fails to load it, its
        # __del__ then fails too and prints an "Exception ignored" traceback after our one-line error.
        lib = ctypes.CDLL(library)
        if not all(hasattr(lib, f) for f in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")):
            raise InterpreterError(f"{library} is not a TFLite delegate library (no tflite_plugin_create_delegate); "
                                   "install libedgetpu1-std from the Coral apt repository, or run without --edgetpu")
        return backend.load_delegate(library)
    except (ValueError, OSError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "not found" in msg.lower() or "cannot open" in msg.lower() or "no such file" in msg.lower():
            raise InterpreterError(f"Edge TPU runtime library {library} is not installed ({msg:.120}); install "
                                   "libedgetpu1-std from the Coral apt repository, or run without --edgetpu"
                                   ) from None
        raise InterpreterError(f"Edge TPU delegate {library} could not be loaded ({msg:.120}); is an Edge TPU "
                               "attached and accessible (USB cable, udev rules, user in plugdev)? Or run "
                               "without --edgetpu") from None


#: The native line ai-edge-litert prints when a process creates its first interpreter.
_ROUTINE_NATIVE_LINES = ("Created TensorFlow Lite XNNPACK delegate for CPU.",)
_cli_owns_stderr = False


def cli_owns_stderr() -> None:
    """Called by the ``edgeexit`` command (a process that owns its stderr and creates interpreters from one
    thread): from now on the interpreter's routine INFO line is dropped, so a refusal prints exactly one line.
    Library users are never affected: without this call file descriptor 2 is left alone."""
    global _cli_owns_stderr
    _cli_owns_stderr = True


@contextlib.contextmanager
def _routine_native_lines_dropped() -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 while the block runs; pass on all but the routine
    XNNPACK line (to ``logging`` as warnings). Only for the CLI: a process-wide redirection would swallow other
    threads' output in a library."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr
        yield
        return
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                ctypes.CDLL(None).fflush(None)   # the native logger's stream is buffered when not a terminal
            except (OSError, AttributeError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                text = line.removeprefix("INFO: ").strip()
                if text and text not in _ROUTINE_NATIVE_LINES:
                    log.warning("interpreter: %s", line.strip())


def create_interpreter(model_path: str | os.PathLike[str], backend: Backend, *, num_threads: int = 1,
                       delegates: list[Any] | None = None, sha256: str | None = None) -> Any:
    """Create and allocate an interpreter for one .tflite file.

    The file is read once; its bytes are checked (:func:`~edgeexit.runtime.tflite.read_model`, and their sha256
    against ``sha256`` when given) and the interpreter is built from those very bytes (``model_content``), so
    what runs is what was checked: a file replaced or rewritten on disk after the check is never mapped.
    The Python interpreter object keeps the bytes alive as long as it lives.

    The process's stderr is left alone (no file-descriptor redirection, so no other thread's output can be
    lost): ai-edge-litert writes one line ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` there the
    first time a process creates an interpreter, and exposes no log-level setting to Python that could
    silence it (its ``TF_CPP_MIN_LOG_LEVEL`` does not reach that logger); tflite-runtime 2.14 prints nothing.
    Only the ``edgeexit`` command, which owns its process, drops that line (:func:`cli_owns_stderr`).

    Args:
        model_path: the .tflite file.
        backend: the interpreter package (:func:`resolve_backend`).
        num_threads: interpreter threads.
        delegates: delegates to apply (the Edge TPU's).
        sha256: the hex sha256 the file's bytes must have (the bundle manifest's); None = not checked.

    Raises:
        UsageError: ``num_threads`` not in 1..MAX_THREADS.
        BundleError: the file cannot be read, its sha256 is not ``sha256``, or it breaks a rule of
            :func:`~edgeexit.runtime.tflite.read_model` (checked before the interpreter sees it), or its declared
            tensor shapes differ from the computed ones.
        InterpreterError: the interpreter rejects the file (unsupported op, ...).
    """
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or not 1 <= num_threads <= MAX_THREADS:
        raise UsageError(f"num_threads must be an integer from 1 to {MAX_THREADS}, got {num_threads!r:.40}")
    name = printable(os.path.basename(os.fspath(model_path)))
    data = read_regular(model_path, MAX_FILE_BYTES, name)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise BundleError(f"{name}: sha256 mismatch (the file was changed after the bundle was checked, or is "
                          "corrupt); re-copy the bundle and load it again")
    model = read_model(data, name)  # refuses what would crash or mislead the interpreter, before it sees it
    kwargs: dict[str, Any] = {"model_content": data, "num_threads": num_threads}
    if delegates:
        kwargs["experimental_delegates"] = delegates
    try:
        with _routine_native_lines_dropped() if _cli_owns_stderr else contextlib.nullcontext():
            interp = backend.interpreter_class(**kwargs)
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        raise InterpreterError(f"{name}: the {backend.name} interpreter cannot load it ({msg:.160}); the file is "
                               "corrupt or needs a newer interpreter: re-copy the bundle or upgrade the interpreter"
                               ) from None
    interp._edgeexit_model_content = data  # the native model points into these bytes: keep them with it
    _same_shapes(interp, model)
    return interp


def _same_shapes(interp: Any, model: Model) -> None:
    """The interpreter's tensor shapes (computed from the operators) equal the shapes the file declares.

    A file whose declared activation shapes disagree with its operators was edited or mis-written; the
    interpreter would run it with shapes the manifest and the cost counts never saw.
    """
    for d in interp.get_tensor_details():
        k = int(d["index"])
        if k < len(model.tensors) and tuple(int(v) for v in d["shape"]) != model.tensors[k].shape:
            raise BundleError(f"{model.name}: tensor {k} ({model.tensors[k].name[:40]!r}) is declared "
                              f"{list(model.tensors[k].shape)} but its operators make it {[int(v) for v in d['shape']]}; "
                              "the file was edited or is corrupt: re-copy or re-create the bundle")


def native_invoke(interp: Any) -> Callable[[], None]:
    """The interpreter's native ``Invoke``: ``invoke()`` without the Python wrapper's live-view check.

    The public ``invoke()`` refuses to run while any numpy view of the interpreter's tensors is alive,
    because ``allocate_tensors()`` / ``resize_tensor_input()`` could move the buffers under it. The Runner
    calls neither after creating an interpreter (bundles have static shapes), so it keeps one view per
    input / output tensor for the interpreter's lifetime and invokes through this function. All three
    backends (ai-edge-litert, tflite-runtime 2.14, tensorflow.lite) wrap the same native object.

    Raises:
        InterpreterError: this interpreter has no native ``Invoke`` (an unknown interpreter build).
    """
    invoke = getattr(getattr(interp, "_interpreter", None), "Invoke", None)
    if not callable(invoke):
        raise InterpreterError(f"{type(interp).__module__}.{type(interp).__name__} has no native Invoke; install "
                               "a supported interpreter: " + INSTALL_HINT)
    return invoke
