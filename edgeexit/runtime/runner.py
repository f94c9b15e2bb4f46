"""The on-device runtime: run a bundle stage by stage and stop at the first exit the rule accepts.

Everything is checked and prepared when the :class:`Runner` is created: bundle files and tensors, zero-copy
views of every tensor the hot path touches, the hand-off plan, and the exit rule compiled into tables over
the exits' int8 output bytes (:mod:`edgeexit.runtime.rules`). A call then costs, besides the invokes of the
stages that run: writing the image into stage 0's input tensor (one numpy call for a uint8 array of the
bundle's size), per stage that may stop the input a ``tolist()`` of its K logit bytes and a few integer
operations, one copy per hand-off, two clock reads and a small result object. Scores, probabilities and
energy are computed only when a result's attribute is read.

    >>> runner = Runner("bundle/")
    >>> result = runner("cat.png")
    >>> result.label_name, result.exit_index, result.macs, result.latency_ms

**Threads.** One Runner may be shared by several threads: every inference holds the Runner's lock, so calls
are serialised (and answered correctly). For inferences in parallel, create one Runner per thread.

**Latency.** ``Result.latency_ms`` covers the call from the image as given to the decision (preprocessing
included); ``edgeexit bench`` times the whole public call from outside, the same way for the early-exit and
the monolithic model.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..energy.boards import DEVICE_TREE_MODEL, Board, get_board
from ..energy.model import Energy, EnergyModel
from ..energy.sources import HwmonSensor, find_power_sensor
from ..errors import BundleError, InputError, UsageError
from .bundle import Bundle, Requantization, check_model_tensors, check_stage_tensors, load_bundle
from .interpreter import create_interpreter, edgetpu_delegate, native_invoke, resolve_backend
from .manifest import QUANTIZED_DTYPES, ExitRuleSpec, Manifest, TensorSpec
from .preprocess import ImageLike, Preprocessor
from .rules import CONTINUE, Decider, ExitRule, exit_scores, rule_from_spec
from .stats import ExitShareReference, RunnerStats, reference_shares
from .trace import ExitQuant, RawOutputs, Trace, unsigned

log = logging.getLogger(__name__)

_clock = time.perf_counter_ns
_NDARRAY = np.ndarray
_U8 = np.dtype(np.uint8)
_XOR_SIGN = np.uint8(0x80)


class _Context:
    """What a result needs to answer its lazily computed attributes (shared, read-only)."""

    __slots__ = ("labels", "cum_macs", "quant", "energy_model")

    def __init__(self, manifest: Manifest, quant: tuple[ExitQuant, ...], energy_model: EnergyModel):
        self.labels = manifest.labels
        self.cum_macs = manifest.cumulative_macs()
        self.quant = quant
        self.energy_model = energy_model

    def scores(self, exit_index: int, q: Sequence[int]) -> np.ndarray:
        x = self.quant[exit_index]
        return exit_scores(x.scale * (np.asarray(q, dtype=np.float64) - x.zero_point), x.scores)


class Result:
    """The answer for one input.

    ``label``, ``exit_index`` (the exit whose answer this is) and ``latency_ms`` (the call, from the image as
    given to the decision) are set by the call; ``label_name``, ``stages_run``, ``macs`` (every segment and head
    up to the exit the input left the network at), ``score`` (the answering exit's softmax / sigmoid score of
    ``label``), ``probabilities`` (its K scores) and ``energy`` (of the stages run) are computed when read.
    With the ``most_confident`` fallback an input no early exit stops runs every stage (``stages_run`` = the
    number of stages, ``macs`` the whole network's) and may be answered by an earlier ``exit_index``.
    """

    __slots__ = ("label", "exit_index", "latency_ms", "_q", "_ctx", "_left")

    #: Whether the server answered (see :class:`OffloadResult`); a plain Result never was offloaded.
    offloaded = False
    offload_error: str | None = None
    round_trip_ms: float | None = None

    def __init__(self, label: int, exit_index: int, latency_ms: float, q: list[int], ctx: _Context,
                 left_at: int | None = None):
        self.label, self.exit_index, self.latency_ms, self._q, self._ctx = label, exit_index, latency_ms, q, ctx
        self._left = exit_index if left_at is None else left_at

    @property
    def label_name(self) -> str:
        return self._ctx.labels[self.label]

    @property
    def stages_run(self) -> int:
        return self._left + 1

    @property
    def macs(self) -> int:
        return self._ctx.cum_macs[self._left]

    @property
    def local_macs(self) -> int:
        """The MACs this device spent (all of :attr:`macs` unless the input was offloaded)."""
        return self.macs

    @property
    def remote_macs(self) -> int:
        """The MACs the offload server spent (0 unless the input was offloaded)."""
        return 0

    @property
    def probabilities(self) -> np.ndarray:
        """[K] float32 class scores of the exit (softmax, or sigmoid for sigmoid exits)."""
        return self._ctx.scores(self.exit_index, self._q).astype(np.float32)

    @property
    def score(self) -> float:
        return float(self._ctx.scores(self.exit_index, self._q)[self.label])

    @property
    def energy(self) -> Energy:
        """This input's energy by kind (measured / board estimate / operation proxy; see :mod:`edgeexit.energy`)."""
        return self._ctx.energy_model.for_exit(self._left, self.latency_ms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = {k: getattr(self, k) for k in ("label", "label_name", "score", "exit_index", "stages_run", "macs",
                                           "latency_ms")}
        d["energy"] = self.energy.to_dict()
        d["probabilities"] = [float(p) for p in self.probabilities]
        return d

    def __repr__(self) -> str:
        return (f"Result(label={self.label}, label_name={self.label_name!r}, exit_index={self.exit_index}, "
                f"macs={self.macs}, latency_ms={self.latency_ms:.4f})")


class OffloadResult(Result):
    """The answer of a Runner that offloads (``Runner(..., offload=URL)``), for every input it classifies.

    ``offloaded``: the server ran the stages after ``offload_after`` and answered; then ``exit_index``,
    ``macs``, ``stages_run``, ``score`` and ``probabilities`` are the network's (the exit that answered, on the
    server), ``local_macs`` / ``remote_macs`` split the MACs between this device and the server, ``round_trip_ms``
    is the request's time and ``energy`` covers this device's stages (the time waiting for the server excluded).
    ``offload_error``: why an input that was to be offloaded finished locally instead (one line), else None.
    """

    __slots__ = ("offloaded", "offload_error", "round_trip_ms", "_local")

    def __init__(self, label: int, exit_index: int, latency_ms: float, q: list[int], ctx: _Context, local_exit: int,
                 offloaded: bool, round_trip_ms: float | None, offload_error: str | None):
        # every slot set here (no super() call: this is on the hot path of every input)
        self.label, self.exit_index, self.latency_ms, self._q, self._ctx = label, exit_index, latency_ms, q, ctx
        self._left, self._local, self.offloaded = exit_index, local_exit, offloaded
        self.round_trip_ms, self.offload_error = round_trip_ms, offload_error

    @property
    def local_macs(self) -> int:
        return self._ctx.cum_macs[self._local]

    @property
    def remote_macs(self) -> int:
        return self.macs - self.local_macs

    @property
    def energy(self) -> Energy:
        waited = self.round_trip_ms if self.offloaded and self.round_trip_ms is not None else 0.0
        return self._ctx.energy_model.for_exit(self._local, max(self.latency_ms - waited, 0.0))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(offloaded=self.offloaded, local_macs=self.local_macs, remote_macs=self.remote_macs,
                 round_trip_ms=self.round_trip_ms, offload_error=self.offload_error)
        return d

    def __repr__(self) -> str:
        return (f"OffloadResult(label={self.label}, exit_index={self.exit_index}, offloaded={self.offloaded}, "
                f"latency_ms={self.latency_ms:.4f}, offload_error={self.offload_error!r})")


class MonolithicResult:
    """The monolithic (no early exit) model's answer for one input."""

    __slots__ = ("label", "latency_ms", "_labels")

    def __init__(self, label: int, latency_ms: float, labels: Sequence[str]):
        self.label, self.latency_ms, self._labels = label, latency_ms, labels

    @property
    def label_name(self) -> str:
        return self._labels[self.label]

    def __repr__(self) -> str:
        return f"MonolithicResult(label={self.label}, label_name={self.label_name!r}, latency_ms={self.latency_ms:.4f})"


class MonolithicBatchResult:
    """The monolithic model's answers for a batch: ``labels`` [B] int64, ``latency_ms`` the whole batch call."""

    __slots__ = ("labels", "latency_ms", "_labels")

    def __init__(self, labels: np.ndarray, latency_ms: float, labels_names: Sequence[str]):
        self.labels, self.latency_ms, self._labels = labels, latency_ms, labels_names

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def label_names(self) -> list[str]:
        return [self._labels[i] for i in self.labels.tolist()]


class BatchResult(Sequence[Result]):
    """The answers for a batch: ``labels`` and ``exit_index`` (the exit each answer came from) as ``[B]`` int64
    arrays, ``stages_run`` ``[B]`` (differs from ``exit_index + 1`` only for answers of the ``most_confident``
    fallback), ``latency_ms`` the whole batch call; ``batch[i]`` is the :class:`Result` of image i (its
    ``latency_ms`` is the batch's time per image)."""

    def __init__(self, labels: np.ndarray, exit_index: np.ndarray, logits: np.ndarray, latency_ms: float,
                 ctx: _Context, left_at: np.ndarray | None = None):
        self.labels, self.exit_index, self.latency_ms = labels, exit_index, latency_ms
        self._logits, self._ctx = logits, ctx
        self._left = exit_index if left_at is None else left_at

    @property
    def stages_run(self) -> np.ndarray:
        return self._left + 1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Result(int(self.labels[i]), int(self.exit_index[i]), self.latency_ms / max(len(self), 1),
                      self._logits[i].tolist(), self._ctx, int(self._left[i]))

    @property
    def macs(self) -> np.ndarray:
        """[B] int64 MACs each input paid (every stage it ran)."""
        return np.asarray(self._ctx.cum_macs, dtype=np.int64)[self._left]

    @property
    def label_names(self) -> list[str]:
        return [self._ctx.labels[i] for i in self.labels.tolist()]


class _Input:
    """Writes an image into an int8 input tensor: one numpy call for uint8 arrays of the tensor's size."""

    def __init__(self, prep: Preprocessor, tensor: np.ndarray):
        self.prep = prep
        self.hwc = tensor[0]                                                       # [H, W, C] view
        lut = prep.lut                                                             # [C, 256]
        same = bool((lut == lut[0]).all())
        views = {tensor.shape: tensor, self.hwc.shape: self.hwc}
        if prep.channels == 1:
            views[self.hwc.shape[:2]] = self.hwc[:, :, 0]
        self.fast: dict[tuple[int, ...], Callable[[np.ndarray], Any]] = {}
        if not same:
            return
        if lut.dtype == np.int8 and np.array_equal(lut[0].view(np.uint8), np.arange(256) ^ 0x80):
            # pixels map 1:1 onto int8 (the usual calibration): q = p - 128 is a sign-bit flip of the byte
            for shape, view in views.items():
                self.fast[shape] = _sign_flip_into(view.view(np.uint8))
        else:
            for shape, view in views.items():
                self.fast[shape] = functools.partial(lut[0].take, out=view)

    def write(self, image: ImageLike) -> None:
        if type(image) is _NDARRAY and image.dtype is _U8:
            fast = self.fast.get(image.shape)
            if fast is not None:
                fast(image)
                return
        np.copyto(self.hwc, self.prep(image))

    def batch(self, images: Any) -> np.ndarray:
        """[B, H, W, C] quantized inputs for a uint8 array [B, H, W(, C)] or any iterable of images."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
            arr = images if images.ndim == 4 else images[..., None]
            if arr.shape[1:] == self.hwc.shape:
                lut = self.prep.lut
                if lut.shape[0] == 1:
                    return lut[0][arr]
                return lut[np.arange(lut.shape[0]), arr]
        try:
            items = list(images)
        except TypeError:
            raise InputError(f"classify_batch takes a uint8 array [B, H, W, C] or a sequence of images, got "
                             f"{type(images).__name__}") from None
        if not items:
            return np.empty((0, *self.hwc.shape), dtype=self.hwc.dtype)
        return np.stack([self.prep(x) for x in items])


def _sign_flip_into(out: np.ndarray) -> Callable[[np.ndarray], Any]:
    xor = np.bitwise_xor

    def write(image: np.ndarray) -> Any:
        return xor(image, _XOR_SIGN, out)
    return write


class _Stage:
    """One stage's native invoke and zero-copy views of its tensors, made once.

    The views stay valid because the interpreter is never re-allocated or resized after creation (see
    :func:`~edgeexit.runtime.interpreter.native_invoke`).
    """

    def __init__(self, interp: Any, manifest: Manifest, k: int):
        spec = manifest.stages[k]
        where = check_stage_tensors(interp, spec)
        self.interp, self.run = interp, native_invoke(interp)  # interp keeps its delegates and buffers alive
        self.inp = interp.tensor(where.input_index)()                                 # [1, H, W, C] int8
        features = where.output_index.get("features")
        self.feat = interp.tensor(features)() if features is not None else None       # [1, h, w, c] int8
        self.logits = interp.tensor(where.output_index["logits"])()[0]                 # [K] int8 / uint8
        conf = where.output_index.get("confidence")
        self.conf = interp.tensor(conf)().reshape(-1) if conf is not None else None    # [1] int8 / uint8
        self.quant = _exit_quant(spec.outputs["logits"], spec.outputs.get("confidence"), spec.scores,
                                 manifest.num_classes)


def _exit_quant(logits: TensorSpec, conf: TensorSpec | None, scores: str, num_classes: int) -> ExitQuant:
    for t in (logits, conf):
        if t is not None and (t.quantization is None or t.dtype not in QUANTIZED_DTYPES):
            raise BundleError(f"output {t.name!r} is not int8- or int16-quantized; edgeexit runs full-integer bundles "
                              "only: re-create it with `edgeexit convert`")
    c = None if conf is None else (conf.quantization.scale, conf.quantization.zero_point, conf.dtype)
    return ExitQuant(scale=logits.quantization.scale, zero_point=logits.quantization.zero_point, dtype=logits.dtype,
                     num_classes=num_classes, scores=scores, confidence=c)


_PLAN_CACHE = 32
_PlanStep = tuple[Callable[[], None], Any, np.ndarray, Any, Callable[[], Any] | None]


class Runner:
    """Runs an early-exit bundle on this device.

    Args:
        bundle: a bundle directory or a :class:`~edgeexit.runtime.bundle.Bundle` from :func:`load_bundle`.
        backend: "auto", "ai-edge-litert", "tflite-runtime" or "tensorflow".
        num_threads: interpreter threads per stage (1 is usually fastest for small stages on a Pi).
        rule: an :class:`~edgeexit.runtime.rules.ExitRule`, an ExitRuleSpec, the name of one of the bundle's
            operating points, or None for the bundle's own exit rule.
        board: a board profile name (see :data:`edgeexit.energy.boards.BOARDS`), a Board, or None to detect it.
        edgetpu: run the stages through the Edge TPU delegate (stage files compiled for the Edge TPU).
        power_sensor: "auto" (first hwmon power sensor, if any), None (none), a hwmon root directory,
            or an :class:`~edgeexit.energy.sources.HwmonSensor`: found and reported as ``runner.sensor``, never
            read per inference (a sensor updates every few ms; ``edgeexit bench`` measures energy over phases
            of many inputs and can store per-exit figures in the bundle, which ``Result.energy`` then reports).
        device_tree_model: device-tree model file used for board detection (injectable for tests).
        trusted_key: require the bundle to be signed by this Ed25519 public key (a PEM path or a loaded key;
            see :func:`~edgeexit.runtime.bundle.load_bundle`); None = ``$EDGEEXIT_TRUSTED_KEY`` if set.
        offload: ``http(s)://HOST:PORT`` of an ``edgeexit serve`` (KServe v2) server hosting this bundle's stages
            after ``offload_after``: an input still undecided after that stage is sent there when the policy
            expects it to pay, and finishes here when the server fails (docs/OFFLOAD.md). Every ``classify``
            then returns an :class:`OffloadResult` (``classify_batch`` and ``trace`` run locally). Exit rules
            that carry state between exits (class_exclusion, the most_confident fallback) cannot be offloaded.
        offload_after: K, the last stage run here for inputs that go to the server (0 .. exits - 2).
        offload_token: the server's bearer token, if it requires one.
        offload_timeout_s: the deadline of one request, everything included (then the input finishes here).
        offload_ca: CA certificates (PEM) for an https server with a private certificate.
        offload_cert, offload_key: this board's client certificate (PEM) and its key (None: in the certificate's
            file), for a server that requires client certificates (``edgeexit serve --tls-client-ca``).
        offload_policy: an :class:`~edgeexit.offload.client.OffloadPolicy` (its margin, back-off); None = defaults.

    A Runner is safe to share between threads (calls are serialised by a lock).

    Raises:
        BundleError, InterpreterError, UsageError: with one-line messages.
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto", num_threads: int = 1,
                 rule: ExitRule | ExitRuleSpec | str | None = None, board: str | Board | None = None,
                 edgetpu: bool = False, power_sensor: str | HwmonSensor | None = "auto",
                 device_tree_model: str = DEVICE_TREE_MODEL, trusted_key: Any = None, offload: str | None = None,
                 offload_after: int | None = None, offload_token: str | None = None, offload_timeout_s: float = 0.25,
                 offload_ca: str | None = None, offload_policy: Any = None, offload_cert: str | None = None,
                 offload_key: str | None = None):
        self.backend = resolve_backend(backend)
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, backend=self.backend, check_tensors=False, trusted_key=trusted_key)
        elif trusted_key is not None:
            raise UsageError("trusted_key checks a bundle while loading it: pass the bundle directory, or "
                             "load_bundle(path, trusted_key=...) yourself")
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.num_threads = num_threads
        self._lock = threading.Lock()
        if edgetpu and self.manifest.activations != "int8":
            raise UsageError(f"this bundle has {self.manifest.activations} activations and the Edge TPU runs int8 "
                             "only; run it without --edgetpu (edgetpu=False), or convert an int8 bundle for the "
                             "Edge TPU")
        self._delegates = [edgetpu_delegate(self.backend)] if edgetpu else None
        # each interpreter is built from the bytes whose sha256 the (verified) manifest names, hashed at creation
        self._stages = [_Stage(create_interpreter(path, self.backend, num_threads=num_threads,
                                                  delegates=self._delegates, sha256=spec.sha256), self.manifest, k)
                        for k, (path, spec) in enumerate(zip(bundle.stage_files, self.manifest.stages))]
        self._handoffs: tuple[Requantization | None, ...] = bundle.handoffs
        self._handoff_calls = self._handoff_plan()
        self._prep = Preprocessor(self.manifest.preprocessing, self.manifest.input)
        self._input = _Input(self._prep, self._stages[0].inp)
        self.quant = tuple(s.quant for s in self._stages)
        self.board = get_board(board, edgetpu=edgetpu, model_path=device_tree_model)
        self.sensor = self._open_sensor(power_sensor)
        self.energy_model = EnergyModel(self.manifest, self.board)
        self._ctx = _Context(self.manifest, self.quant, self.energy_model)
        self._mono: tuple[Callable[[], None], _Input, np.ndarray] | None = None
        self.stats = RunnerStats(self.manifest.num_exits, self.manifest.cumulative_macs())
        self._counts, self._latency_ns = self.stats.counts, self.stats.latency_ns   # updated in place per call
        self._fast_input = self._input.fast
        self._plans: OrderedDict[tuple[type, str], tuple[Decider, tuple[_PlanStep, ...]]] = OrderedDict()
        self.rule: ExitRule = self._resolve_rule(rule)
        self._decider, self._plan = self._compile(self.rule)
        self._state0 = self._decider.start()
        self._picks, self._last = self._decider.picks, len(self._stages) - 1
        self._warm_up()
        self.stats.set_reference(self._tuned_shares(self.rule))
        self.offload: Any = None
        if offload is not None or offload_after is not None:
            self.offload = self._open_offload(offload, offload_after, offload_token, offload_timeout_s, offload_ca,
                                              offload_policy, offload_cert, offload_key)
            self.classify = self._classify_offloaded  # type: ignore[method-assign]  # classify() itself unchanged
        log.info("runner: %d stages, backend %s %s, %d thread(s), rule %r, board %s", len(self._stages),
                 self.backend.name, self.backend.version, num_threads, self.rule, self.board.name)

    def _warm_up(self) -> None:
        """Pay the one-time costs here, not in the first result's latency (and energy): Pillow's import, its
        format plugins (``Image.init()``) and a PNG decode through the image path; the first touch of the input
        tables and tensors; one invoke of every stage and of the monolithic model on a zero image. The
        per-exit statistics are restored afterwards."""
        h, w = self.manifest.preprocessing.size
        zero = np.zeros((h, w, self.manifest.preprocessing.channels), dtype=np.uint8)      # [H, W, C]
        try:
            import io

            from PIL import Image
        except ImportError:  # arrays only: nothing of Pillow's to warm up
            pass
        else:
            Image.init()
            png = io.BytesIO()
            Image.new(self.manifest.preprocessing.color_mode, (w + 1, h + 1)).save(png, format="PNG")
            png.seek(0)
            with Image.open(png) as img:
                self._prep(img)                                    # decode, convert, resize, lookup
        counts, latency_ns = list(self._counts), list(self._latency_ns)
        self.classify(zero)
        for st in self._stages:                                   # the stages the zero image did not reach
            st.run()
        if self.has_monolithic:
            self.run_monolithic(zero)
        self._counts[:], self._latency_ns[:] = counts, latency_ns  # in place: the hot path holds these lists

    def _open_offload(self, url: str | None, after: int | None, token: str | None, timeout_s: float,
                      ca_file: str | None, policy: Any, cert_file: str | None = None,
                      key_file: str | None = None) -> Any:
        from ..offload.client import OffloadClient, OffloadLink, OffloadPolicy
        from ..offload.protocol import bundle_fingerprint, tail_model_name

        last = len(self._stages) - 1
        if url is None or after is None or type(after) is not int or not 0 <= after < last:
            raise UsageError(f"offloading needs offload=URL and offload_after=K with K in 0..{last - 1} (the last "
                             f"stage run here), got offload={url!r}, offload_after={after!r}")
        client = OffloadClient(url, tail_model_name(self.manifest.name, after), token=token, timeout_s=timeout_s,
                               ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        link = OffloadLink(client, policy or OffloadPolicy(), after, last,
                           bundle_fingerprint([s.sha256 for s in self.manifest.stages]),
                           self.manifest.num_classes, self._stages[last].logits.dtype.name)
        link.set_rule(self.rule.to_spec().to_dict())
        if link.policy.local_ms is None:
            link.policy.ran_locally(self._tail_ms(after))
        log.info("runner: offloading inputs undecided after stage %d to %s (local tail %.3f ms)", after, url,
                 link.policy.local_ms)
        return link

    def _tail_ms(self, after: int, reps: int = 20) -> float:
        """Median time (ms) of the stages after ``after`` and their hand-offs, on whatever the tensors hold."""
        steps = [(st.run, h) for st, h in zip(self._stages[after + 1:], self._handoff_calls[after + 1:])]
        times = []
        with self._lock:
            for _ in range(reps):
                t0 = _clock()
                self._handoff_calls[after]()
                for run, handoff in steps:
                    run()
                    if handoff is not None:
                        handoff()
                times.append(_clock() - t0)
        return float(np.median(times)) * 1e-6

    # ---- configuration ------------------------------------------------------------------------------
    @staticmethod
    def _open_sensor(power_sensor: str | HwmonSensor | None) -> HwmonSensor | None:
        if power_sensor is None or isinstance(power_sensor, HwmonSensor):
            return power_sensor
        if power_sensor == "auto":
            return find_power_sensor()
        return find_power_sensor(os.fspath(power_sensor))

    def _resolve_rule(self, rule: ExitRule | ExitRuleSpec | str | None) -> ExitRule:
        if rule is None:
            rule = self.manifest.exit_rule
        if isinstance(rule, str):
            rule = self.operating_point(rule)
        if isinstance(rule, ExitRuleSpec):
            rule = rule_from_spec(rule)
        if not isinstance(rule, ExitRule):
            raise UsageError(f"rule must be an ExitRule, an ExitRuleSpec or an operating point name, got "
                             f"{type(rule).__name__}")
        return rule

    def _handoff_plan(self) -> tuple[Callable[[], Any] | None, ...]:
        """Per stage, the call that moves its features into the next stage's input (None after the last):
        one copy of the int8 bytes, or a requantization where the two quantizations differ."""
        stages, calls = self._stages, []
        for k, st in enumerate(stages[:-1]):
            requant = self._handoffs[k]
            calls.append(functools.partial(np.copyto, stages[k + 1].inp, st.feat) if requant is None else
                         functools.partial(requant.apply, st.feat, stages[k + 1].inp))
        return (*calls, None)

    def _compile(self, rule: ExitRule) -> tuple[Decider, tuple[_PlanStep, ...]]:
        """The rule's decider for this bundle and the per-stage plan of the hot loop. The last
        ``_PLAN_CACHE`` rules are kept by value, so that switching between operating points recompiles nothing."""
        key = (type(rule), repr(rule))
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            return cached
        decider = rule.compile(self.quant)
        plan = [(st.run, decider.steps[k], st.logits, st.conf, self._handoff_calls[k])
                for k, st in enumerate(self._stages)]
        self._plans[key] = (decider, tuple(plan))
        if len(self._plans) > _PLAN_CACHE:
            self._plans.popitem(last=False)
        return decider, tuple(plan)

    def operating_point(self, name: str) -> ExitRuleSpec:
        """The exit rule stored under ``name`` in the bundle's operating points.

        Raises:
            UsageError: no such operating point.
        """
        try:
            rule = self.manifest.point_rule(name)
        except BundleError as exc:
            raise UsageError(str(exc)) from None
        if rule is None:
            names = sorted(k for k in self.manifest.operating_points if self.manifest.point_rule(k) is not None)
            raise UsageError(f"the bundle has no operating point {name!r}; it has {names or 'none'} "
                             "(create them with `edgeexit tune`)")
        return rule

    def set_rule(self, rule: ExitRule | ExitRuleSpec | str) -> None:
        """Use another exit rule from the next input on (no reload; a rule used before is not recompiled)."""
        resolved = self._resolve_rule(rule)
        compiled = self._compile(resolved)
        reference = self._tuned_shares(resolved)
        if self.offload is not None:
            self.offload.set_rule(resolved.to_spec().to_dict())
        with self._lock:
            self.rule = resolved
            self._decider, self._plan = compiled
            self._state0 = compiled[0].start()
            self._picks = compiled[0].picks
            self.stats.set_reference(reference)

    def _tuned_shares(self, rule: ExitRule) -> ExitShareReference | None:
        """The exit shares ``rule`` was tuned to, when it is one of the bundle's stored operating points."""
        try:
            spec = rule.to_spec()
        except UsageError:            # a rule that cannot be stored (the benchmark's forced exits) was never tuned
            return None
        return reference_shares(self.manifest.operating_points, spec.kind, spec.thresholds)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Keep the rule's kind, change its thresholds (one per exit except the last)."""
        self.set_rule(self.rule.with_thresholds(thresholds))

    def reset_stats(self) -> None:
        """Forget the per-exit statistics (the drift test then starts again from the next input)."""
        self.stats.reset()

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    # ---- inference ------------------------------------------------------------------------------------
    def preprocess(self, image: ImageLike) -> np.ndarray:
        """The quantized stage-0 input for ``image``: ``[H, W, C]`` int8 (see :mod:`edgeexit.runtime.preprocess`)."""
        return self._prep(image)

    def __call__(self, image: ImageLike) -> Result:
        return self.classify(image)

    def classify(self, image: ImageLike) -> Result:
        """Classify one image, stopping at the first exit the rule accepts.

        Args:
            image: file path, PIL image or numpy array (see :mod:`edgeexit.runtime.preprocess`).

        Raises:
            InputError: the image cannot be used (one-line message).
        """
        with self._lock:
            t0 = _clock()
            fast = self._fast_input.get(image.shape) if type(image) is _NDARRAY and image.dtype is _U8 else None
            if fast is not None:
                fast(image)
            else:
                self._input.write(image)
            state = self._state0
            k, label, q = 0, CONTINUE, None
            for run, step, logits, conf, handoff in self._plan:
                run()
                if step is not None:
                    q = logits.tolist()
                    label, state = step(q, conf, state)
                    if label >= 0:
                        break
                handoff()
                k += 1
            dt = _clock() - t0
            self._counts[k] += 1
            self._latency_ns[k] += dt
            if self._picks and k == self._last:   # most_confident: the answer may come from an earlier exit
                return Result(label, state[1], dt * 1e-6, state[2], self._ctx, k)
        return Result(label, k, dt * 1e-6, q, self._ctx)

    def _classify_offloaded(self, image: ImageLike) -> OffloadResult:
        """:meth:`classify` of a Runner that offloads (it replaces ``classify`` on such a Runner only): the same
        loop; after stage K an undecided input goes to the server when the policy expects that to pay, and runs
        on here when the request fails (the reason in ``offload_error``)."""
        link, after = self.offload, self.offload.after
        with self._lock:
            t0 = _clock()
            fast = self._fast_input.get(image.shape) if type(image) is _NDARRAY and image.dtype is _U8 else None
            if fast is not None:
                fast(image)
            else:
                self._input.write(image)
            k, label, q, state = self._run_stages(self._plan, 0, after + 1, self._state0)
            error, round_trip, t_tail = None, None, None
            if label < 0:                       # undecided after stage K (its hand-off made)
                answer, error, round_trip = link.ask(self._stages[after].feat)
                if answer is not None:
                    dt = _clock() - t0
                    self._counts[answer.exit_index] += 1
                    self._latency_ns[answer.exit_index] += dt
                    return OffloadResult(answer.label, answer.exit_index, dt * 1e-6, answer.logits, self._ctx, after,
                                         True, round_trip, None)
                t_tail = _clock()
                k, label, q, state = self._run_stages(self._plan, k, len(self._plan), state)
            t1 = _clock()
            dt = t1 - t0
            self._counts[k] += 1
            self._latency_ns[k] += dt
            if t_tail is not None:
                link.policy.ran_locally((t1 - t_tail) * 1e-6)
        return OffloadResult(label, k, dt * 1e-6, q, self._ctx, k, False, round_trip, error)

    @staticmethod
    def _run_stages(plan: Sequence[Any], k: int, end: int, state: Any) -> tuple[int, int, list[int] | None, Any]:
        """Stages ``k .. end - 1`` of a compiled plan, each decided by the rule, the hand-off made after each
        undecided one: ``(stage that decided or end, label or CONTINUE, its logits, rule state)``. The offload paths
        use it; :meth:`classify` keeps the same loop inline (one call less on every input's hot path)."""
        label, q = CONTINUE, None
        for run, step, logits, conf, handoff in plan[k:end]:
            run()
            if step is not None:
                q = logits.tolist()
                label, state = step(q, conf, state)
                if label >= 0:
                    break
            handoff()
            k += 1
        return k, label, q, state

    def continue_from(self, after: int, handoff: np.ndarray, rule: ExitRule | None = None) -> Result:
        """Finish an input from its stage-``after`` hand-off: stages ``after + 1 ..`` with the rule's decisions,
        exactly as :meth:`classify` runs them (the offload server's call; the answer equals the local one).

        Args:
            after: the stage whose ``features`` output ``handoff`` is (0 .. exits - 2).
            handoff: that output, ``[1, h, w, c]`` of its dtype (int8, or int16 for int16 bundles).
            rule: an exit rule without state between exits (see :mod:`edgeexit.offload.protocol`), or None for
                the Runner's.

        Raises:
            InputError: ``handoff`` has another shape or dtype. UsageError: ``after`` is out of range.
        """
        last = len(self._stages) - 1
        if type(after) is not int or not 0 <= after < last:
            raise UsageError(f"continue_from: after must be a stage index in 0..{last - 1}, got {after!r}")
        want = self._stages[after].feat
        if not isinstance(handoff, np.ndarray) or handoff.shape != want.shape or handoff.dtype != want.dtype:
            got = (f"{handoff.dtype}{list(handoff.shape)}" if isinstance(handoff, np.ndarray)
                   else type(handoff).__name__)
            raise InputError(f"hand-off after stage {after} must be {want.dtype}{list(want.shape)}, got {got}")
        decider, plan = (self._decider, self._plan) if rule is None else self._compile(rule)
        if decider.picks or decider.start() is not None:
            raise UsageError(f"continue_from: rule {rule or self.rule!r} carries state between exits, which a "
                             "hand-off does not hold; use a rule without (confidence, max_softmax, entropy, final, "
                             "fixed; fallback final)")
        requant, target = self._handoffs[after], self._stages[after + 1].inp
        with self._lock:
            t0 = _clock()
            np.copyto(target, handoff) if requant is None else requant.apply(handoff, target)
            k, label, q, _ = self._run_stages(plan, after + 1, len(plan), decider.start())
            dt = _clock() - t0
            self._counts[k] += 1
            self._latency_ns[k] += dt
        return Result(label, k, dt * 1e-6, q, self._ctx)

    def classify_batch(self, images: Any) -> BatchResult:
        """Classify a batch: stage 0 runs for every image, each later stage only for the images still
        undecided, with the exit decisions made for all survivors at once. Answers equal :meth:`classify`'s
        image by image.

        Args:
            images: a uint8 array ``[B, H, W, C]`` (or ``[B, H, W]`` for one-channel bundles) or a sequence of
                anything :meth:`classify` takes.

        Raises:
            InputError: an image cannot be used (one-line message).
        """
        with self._lock:
            t0 = _clock()
            x = self._input.batch(images)                                   # [B, H, W, C] quantized
            n = x.shape[0]
            decider, stages, last = self._decider, self._stages, len(self._stages) - 1
            labels = np.full(n, CONTINUE, dtype=np.int64)
            exits = np.full(n, last, dtype=np.int64)                        # where each input left
            answered = exits if not decider.picks else exits.copy()          # the exit each answer came from
            exit_logits = np.zeros((n, self.manifest.num_classes), dtype=stages[-1].logits.dtype)
            alive, state = np.arange(n), decider.start_many(n)
            for k, st in enumerate(stages):
                m = alive.size
                if m == 0:
                    break
                logits = np.empty((m, *st.logits.shape), dtype=st.logits.dtype)
                conf = np.empty(m, dtype=st.conf.dtype) if st.conf is not None else None
                feat = np.empty((m, *st.feat.shape[1:]), dtype=st.feat.dtype) if k < last else None
                inp, run = st.inp[0], st.run
                for j in range(m):
                    np.copyto(inp, x[j])
                    run()
                    logits[j] = st.logits
                    if conf is not None:
                        conf[j] = st.conf[0]
                    if feat is not None:
                        feat[j] = st.feat[0]
                if decider.inspects[k]:
                    decided, state = decider.decide_many(k, logits, conf, state)
                    stop = decided != CONTINUE
                else:
                    decided, stop = None, np.zeros(m, dtype=bool)
                if decider.picks:   # keep the logits of every input's best exit so far
                    best = state[:, 1] == k
                    exit_logits[alive[best]] = logits[best]
                if stop.any():
                    idx = alive[stop]
                    labels[idx], exits[idx] = decided[stop], k
                    if not decider.picks or k < last:
                        answered[idx], exit_logits[idx] = k, logits[stop]
                    else:                           # the last exit: the best exit answers, its logits kept above
                        answered[idx] = state[stop, 1]
                go = ~stop
                alive = alive[go]
                if state is not None:
                    state = state[go]
                if feat is not None:
                    feat = feat[go]
                    requant = self._handoffs[k]
                    if requant is None:
                        x = feat
                    else:
                        x = np.empty((feat.shape[0], *stages[k + 1].inp.shape[1:]), dtype=stages[k + 1].inp.dtype)
                        requant.apply(feat, x)
            dt = _clock() - t0
            if n:
                counts = np.bincount(exits, minlength=len(stages))
                for k, c in enumerate(counts.tolist()):
                    if c:
                        self.stats.record_many(k, c, dt * c // n)
        return BatchResult(labels, answered, exit_logits, dt * 1e-6, self._ctx, exits)

    def trace(self, images: Iterable[ImageLike], labels: Sequence[int] | np.ndarray | None = None) -> Trace:
        """Run EVERY stage for each image and record every exit's outputs (for tuning and benchmarks).

        Returns:
            A :class:`~edgeexit.runtime.trace.Trace` with the exits' raw int8 outputs and their dequantized
            values, and ``[N, E]`` per-stage latencies (invoke + hand-off, ms).
        """
        stages, handoffs = self._stages, self._handoff_calls
        raw_logits: list[list[np.ndarray]] = [[] for _ in stages]
        raw_conf: list[list[np.ndarray]] = [[] for _ in stages]
        times: list[list[int]] = []
        with self._lock:
            for image in images:
                self._input.write(image)
                row = []
                t = _clock()
                for k, st in enumerate(stages):
                    st.run()
                    raw_logits[k].append(st.logits.copy())
                    if st.conf is not None:
                        raw_conf[k].append(st.conf.copy())
                    if handoffs[k] is not None:
                        handoffs[k]()
                    now = _clock()
                    row.append(now - t)
                    t = now
                times.append(row)
        n, k_classes = len(times), self.manifest.num_classes
        lab = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
            if lab.shape[0] != n:
                raise UsageError(f"got {lab.shape[0]} labels for {n} images; pass one label per image")
        logits_q = tuple(np.stack(v) if v else np.zeros((0, k_classes), st.logits.dtype)
                         for v, st in zip(raw_logits, stages))
        conf_q = tuple((np.concatenate(c) if c else np.zeros(0, st.conf.dtype)) if st.conf is not None else None
                       for c, st in zip(raw_conf, stages))
        raw = RawOutputs(logits=logits_q, confidence=conf_q, quant=self.quant)
        return Trace(
            logits=tuple(x.byte_values().astype(np.float32)[unsigned(q)] for x, q in zip(self.quant, logits_q)),
            confidence=tuple(None if c is None else np.asarray(x.confidence_byte_values(), np.float32)[unsigned(c)]
                             for x, c in zip(self.quant, conf_q)),
            scores=tuple(x.scores for x in self.quant),
            stage_latency_ms=np.asarray(times, dtype=np.float64).reshape(n, len(stages)) * 1e-6,
            labels=lab, raw=raw)

    def _monolithic(self) -> tuple[Callable[[], None], _Input, np.ndarray]:
        if self._mono is None:
            spec, path = self.manifest.monolithic, self.bundle.monolithic_file
            if spec is None or path is None:
                raise BundleError("this bundle has no monolithic.tflite; re-convert with the monolithic baseline "
                                  "to compare against it")
            interp = create_interpreter(path, self.backend, num_threads=self.num_threads,
                                        delegates=self._delegates, sha256=spec.sha256)
            in_idx, out_idx = check_model_tensors(interp, spec.input, spec.output, spec.file)
            inp = interp.tensor(in_idx)()
            prep = Preprocessor(self.manifest.preprocessing, spec.input)
            self._mono_interp = interp   # keeps the interpreter (its buffers and delegates) alive
            self._mono = (native_invoke(interp), _Input(prep, inp), interp.tensor(out_idx)()[0])
        return self._mono

    def run_monolithic(self, image: ImageLike) -> MonolithicResult:
        """Classify with the bundle's monolithic.tflite (the same network without early exits), the same
        way :meth:`classify` runs a stage: the image as given in, the argmax of the logits out.

        Raises:
            BundleError: the bundle has no monolithic model.
        """
        run, inp, out = self._mono or self._monolithic()
        with self._lock:
            t0 = _clock()
            inp.write(image)
            run()
            q = out.tolist()
            label = q.index(max(q))
            dt = _clock() - t0
        return MonolithicResult(label, dt * 1e-6, self.manifest.labels)

    def run_monolithic_batch(self, images: Any) -> "MonolithicBatchResult":
        """The monolithic model on a batch, the way :meth:`classify_batch` runs stage 0 (for throughput
        comparisons at the same batch size): labels ``[B]``, every input at the last exit.

        Raises:
            BundleError: the bundle has no monolithic model. InputError: an image cannot be used.
        """
        run, inp, out = self._mono or self._monolithic()
        with self._lock:
            t0 = _clock()
            x = inp.batch(images)
            n = x.shape[0]
            logits = np.empty((n, *out.shape), dtype=out.dtype)
            hwc = inp.hwc
            for j in range(n):
                np.copyto(hwc, x[j])
                run()
                logits[j] = out
            labels = logits.astype(np.int32).argmax(axis=-1).astype(np.int64) if n else np.zeros(0, np.int64)
            dt = _clock() - t0
        return MonolithicBatchResult(labels, dt * 1e-6, self.manifest.labels)

    @property
    def has_monolithic(self) -> bool:
        """Whether the bundle carries its monolithic model (the baseline of ``run_monolithic``)."""
        return self.manifest.monolithic is not None and self.bundle.monolithic_file is not None

    def stage_invokers(self) -> list[Callable[[], None]]:
        """Each stage's bare invoke (for benchmarks that time the interpreters without the Runner around them)."""
        return [s.run for s in self._stages]
