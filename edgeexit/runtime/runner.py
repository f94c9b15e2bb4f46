"""The on-device runtime: run a bundle stage by stage and stop at the first exit the rule accepts.

Everything is checked and prepared when the :class:`Runner` is created (bundle files, tensors, hand-off
plan, tensor indices, dequantization parameters, lookup tables). The hot path then only copies the input
into stage 0's input tensor through a zero-copy view, invokes, dequantizes the small ``logits`` /
``confidence`` outputs, asks the rule, and copies the int8 features straight into the next stage's input
tensor (requantizing only where the bundle's hand-off quantization differs).

    >>> runner = Runner("bundle/")
    >>> result = runner("cat.png")
    >>> result.label_name, result.exit_index, result.macs, result.latency_ms
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..energy.boards import DEVICE_TREE_MODEL, Board, get_board
from .bundle import Bundle, Requantization, check_model_tensors, check_stage_tensors, load_bundle
from ..energy.proxy import OPS_SOURCE, Energy, HwmonSensor, find_power_sensor, stages_ops_mj
from ..errors import BundleError, UsageError
from .interpreter import create_interpreter, edgetpu_delegate, native_invoke, resolve_backend
from .manifest import ExitRuleSpec, Manifest
from .preprocess import ImageLike, Preprocessor
from .rules import CONTINUE, ExitRule, rule_from_spec
from .trace import Trace
from .stats import RunnerStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """The answer for one input.

    ``macs`` is the sum of ``segment_macs + head_macs`` over the stages that ran (every head paid for).
    ``latency_ms`` covers stage 0's input copy through the last decision (preprocessing excluded);
    ``stage_latency_ms[i]`` is stage i's share (invoke + dequantize + decide + hand-off).
    """

    label: int
    label_name: str
    score: float                       # the exit's softmax / sigmoid score of ``label``
    exit_index: int
    stages_run: int
    macs: int
    latency_ms: float
    stage_latency_ms: tuple[float, ...]
    energy: Energy
    probabilities: np.ndarray | None = None  # [K] float32 scores of the exit, if asked for

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = {k: getattr(self, k) for k in ("label", "label_name", "score", "exit_index", "stages_run", "macs",
                                           "latency_ms")}
        d["stage_latency_ms"] = list(self.stage_latency_ms)
        d["energy"] = {k: getattr(self.energy, k) for k in ("ops_mj", "board_mj", "measured_mj", "ops_source",
                                                            "board_source", "measured_source")}
        if self.probabilities is not None:
            d["probabilities"] = [float(p) for p in self.probabilities]
        return d


@dataclass(frozen=True)
class MonolithicResult:
    """The monolithic (no early exit) model's answer for one input."""

    label: int
    label_name: str
    latency_ms: float


class _Stage:
    """Hot-path data of one stage: its native invoke and zero-copy views of its tensors, made once.

    The views stay valid because the interpreter is never re-allocated or resized after creation (see
    :func:`~edgeexit.runtime.interpreter.native_invoke`); writing ``inp`` and reading ``feat`` / ``logits_q`` /
    ``conf_q`` therefore costs no call into the interpreter at all.
    """

    __slots__ = ("interp", "run", "inp", "feat", "logits_q", "conf_q", "has_confidence", "logits_lut", "conf_lut",
                 "scores")

    def __init__(self, interp: Any, manifest: Manifest, k: int):
        spec = manifest.stages[k]
        where = check_stage_tensors(interp, spec)
        self.interp, self.run = interp, native_invoke(interp)  # interp keeps its delegates and buffers alive
        self.inp = interp.tensor(where.input_index)()                              # [1, H, W, C] int8
        features = where.output_index.get("features")
        self.feat = interp.tensor(features)() if features is not None else None  # [1, h, w, c] int8
        self.logits_q = interp.tensor(where.output_index["logits"])()[0].view(np.uint8)  # [K] raw bytes
        conf = where.output_index.get("confidence")
        self.has_confidence = conf is not None
        self.conf_q = interp.tensor(conf)().reshape(-1).view(np.uint8) if conf is not None else None  # [1]
        self.logits_lut = _dequant_table(spec.outputs["logits"])
        conf_spec = spec.outputs.get("confidence")
        self.conf_lut = _dequant_table(conf_spec) if conf_spec is not None else None
        self.scores = spec.scores


def _dequant_table(tensor: Any) -> np.ndarray:
    """[256] float32: the real value of every int8/uint8 byte, ``(q - zero_point) * scale`` in float32.

    Indexed with the output's bytes viewed as uint8 (one fancy-index instead of three array operations);
    classify and trace both use it, so their values are bit-identical.
    """
    if tensor is None or tensor.quantization is None or tensor.dtype not in ("int8", "uint8"):
        raise BundleError(f"output {getattr(tensor, 'name', '?')!r} is not int8-quantized; edgeexit runs full-integer "
                          "bundles only: re-create it with `edgeexit convert`")
    q = np.arange(256, dtype=np.uint8)
    values = q.view(np.int8) if tensor.dtype == "int8" else q
    return (values.astype(np.float32) - np.float32(tensor.quantization.zero_point)) * np.float32(
        tensor.quantization.scale)


def _exit_scores(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max())
    return e / e.sum()


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
            or an :class:`~edgeexit.energy.proxy.HwmonSensor`.
        device_tree_model: device-tree model file used for board detection (injectable for tests).

    Raises:
        BundleError, InterpreterError, UsageError: with one-line messages.
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto", num_threads: int = 1,
                 rule: ExitRule | ExitRuleSpec | str | None = None, board: str | Board | None = None,
                 edgetpu: bool = False, power_sensor: str | HwmonSensor | None = "auto",
                 device_tree_model: str = DEVICE_TREE_MODEL):
        self.backend = resolve_backend(backend)
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, backend=self.backend, check_tensors=False)
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.num_threads = num_threads
        self._delegates = [edgetpu_delegate(self.backend)] if edgetpu else None
        self._stages = [_Stage(create_interpreter(path, self.backend, num_threads=num_threads,
                                                  delegates=self._delegates), self.manifest, k)
                        for k, path in enumerate(bundle.stage_files)]
        self._handoffs: tuple[Requantization | None, ...] = bundle.handoffs
        self._prep = Preprocessor(self.manifest.preprocessing, self.manifest.input)
        self._cum_macs = self.manifest.cumulative_macs()
        ops = stages_ops_mj(self.manifest)
        self._cum_ops_mj = tuple(float(np.sum(ops[:k + 1])) for k in range(len(ops)))
        self.board = get_board(board, edgetpu=edgetpu, model_path=device_tree_model)
        self._board_source = (f"latency x {self.board.title} active power {self.board.active_w:g} W "
                              f"({self.board.source})")
        self.sensor = self._open_sensor(power_sensor)
        self._measured_source = (self.sensor.description if self.sensor is not None else
                                 "no power sensor found (no hwmon power*_input or curr/in pair); energy is the "
                                 f"{self.board.name} board-profile estimate only")
        self._num_classes = self.manifest.num_classes
        self._mono: tuple[Callable[[], None], np.ndarray, np.ndarray] | None = None
        self.stats = RunnerStats(self.manifest.num_exits)
        self.rule: ExitRule = self._resolve_rule(rule)
        log.info("runner: %d stages, backend %s %s, %d thread(s), rule %r, board %s", len(self._stages),
                 self.backend.name, self.backend.version, num_threads, self.rule, self.board.name)

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
        rule.prepare(self.manifest.num_exits, [s.scores for s in self.manifest.stages],
                     [s.has_confidence for s in self._stages])
        return rule

    def operating_point(self, name: str) -> ExitRuleSpec:
        """The exit rule stored under ``name`` in the bundle's operating points.

        Raises:
            UsageError: no such operating point.
        """
        points: Mapping[str, Any] = self.manifest.operating_points
        try:
            rule = self.manifest.point_rule(name)
        except BundleError as exc:
            raise UsageError(str(exc)) from None
        if rule is None:
            raise UsageError(f"the bundle has no operating point {name!r}; it has {sorted(points) or 'none'} "
                             "(create them with `edgeexit tune`)")
        return rule

    def set_rule(self, rule: ExitRule | ExitRuleSpec | str) -> None:
        """Use another exit rule from the next input on (no reload)."""
        self.rule = self._resolve_rule(rule)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Keep the rule's kind, change its thresholds (one per exit except the last)."""
        self.rule = self._resolve_rule(self.rule.with_thresholds(thresholds))

    def reset_stats(self) -> None:
        """Forget the per-exit statistics."""
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

    def classify(self, image: ImageLike, probabilities: bool = False) -> Result:
        """Classify one image, stopping at the first exit the rule accepts.

        Args:
            image: file path, PIL image or numpy array (see :mod:`edgeexit.runtime.preprocess`).
            probabilities: also return the exit's class scores.

        Raises:
            InputError: the image cannot be used (one-line message).
        """
        q = self._prep(image)  # [H, W, C] int8
        sensor = self.sensor
        watts_before = sensor.read_watts() if sensor is not None else None
        rule, stages, handoffs = self.rule, self._stages, self._handoffs
        last = len(stages) - 1
        state = rule.begin(self._num_classes)
        marks = []
        clock = time.perf_counter_ns
        t0 = clock()
        np.copyto(stages[0].inp[0], q)
        label = CONTINUE
        k = 0
        inspect, use_conf, stop_at = rule.inspects_exits, rule.uses_confidence, rule.stop_exit
        for k, st in enumerate(stages):
            st.run()
            if inspect or k == stop_at or k == last:
                logits = st.logits_lut[st.logits_q]                                        # [K] float32
                conf = st.conf_lut[st.conf_q] if use_conf and st.conf_lut is not None else None  # [1] float32
                label = rule.decide(k, logits, conf, state)
                if label != CONTINUE:
                    marks.append(clock())
                    break
            requant = handoffs[k]
            if requant is None:
                np.copyto(stages[k + 1].inp, st.feat)
            else:
                requant.apply(st.feat, stages[k + 1].inp)
            marks.append(clock())
        stage_ms = tuple((b - a) * 1e-6 for a, b in zip([t0] + marks[:-1], marks))
        latency_ms = (marks[-1] - t0) * 1e-6
        measured_mj = None
        if sensor is not None:
            watts_after = sensor.read_watts()
            if watts_before is not None and watts_after is not None:
                measured_mj = 0.5 * (watts_before + watts_after) * latency_ms
        scores = _exit_scores(logits, stages[k].scores)
        energy = Energy(ops_mj=self._cum_ops_mj[k], board_mj=latency_ms * self.board.active_w,
                        measured_mj=measured_mj, ops_source=OPS_SOURCE, board_source=self._board_source,
                        measured_source=self._measured_source)
        result = Result(label=label, label_name=self.manifest.labels[label], score=float(scores[label]),
                        exit_index=k, stages_run=k + 1, macs=self._cum_macs[k], latency_ms=latency_ms,
                        stage_latency_ms=stage_ms, energy=energy,
                        probabilities=scores.astype(np.float32) if probabilities else None)
        self.stats.record(k, result.macs, latency_ms, energy.ops_mj, energy.board_mj, measured_mj)
        return result

    def trace(self, images: Iterable[ImageLike], labels: Sequence[int] | np.ndarray | None = None) -> Trace:
        """Run EVERY stage for each image and record every exit's outputs (for tuning and benchmarks).

        Returns:
            A :class:`~edgeexit.runtime.trace.Trace` with ``[N, K]`` logits and ``[N]`` confidences per exit and
            ``[N, E]`` per-stage latencies (invoke + hand-off, ms).
        """
        stages, handoffs = self._stages, self._handoffs
        logits: list[list[np.ndarray]] = [[] for _ in stages]
        confs: list[list[np.ndarray]] = [[] for _ in stages]
        times: list[list[float]] = []
        clock = time.perf_counter_ns
        for image in images:
            q = self._prep(image)
            row = []
            t = clock()
            np.copyto(stages[0].inp[0], q)
            for k, st in enumerate(stages):
                st.run()
                logits[k].append(st.logits_lut[st.logits_q])
                if st.has_confidence:
                    confs[k].append(st.conf_lut[st.conf_q])
                if k + 1 < len(stages):
                    if handoffs[k] is None:
                        np.copyto(stages[k + 1].inp, st.feat)
                    else:
                        handoffs[k].apply(st.feat, stages[k + 1].inp)
                now = clock()
                row.append((now - t) * 1e-6)
                t = now
            times.append(row)
        n = len(times)
        k_classes = self._num_classes
        lab = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
            if lab.shape[0] != n:
                raise UsageError(f"got {lab.shape[0]} labels for {n} images; pass one label per image")
        return Trace(
            logits=tuple(np.stack(l) if l else np.zeros((0, k_classes), np.float32) for l in logits),
            confidence=tuple((np.concatenate(c) if c else np.zeros(0, np.float32))
                             if st.has_confidence else None for c, st in zip(confs, stages)),
            scores=tuple(st.scores for st in stages),
            stage_latency_ms=np.asarray(times, dtype=np.float64).reshape(n, len(stages)),
            labels=lab)

    def run_monolithic(self, image: ImageLike) -> MonolithicResult:
        """Classify with the bundle's monolithic.tflite (the same network without early exits).

        Raises:
            BundleError: the bundle has no monolithic model.
        """
        if self._mono is None:
            spec, path = self.manifest.monolithic, self.bundle.monolithic_file
            if spec is None or path is None:
                raise BundleError("this bundle has no monolithic.tflite; re-convert with the monolithic baseline "
                                  "to compare against it")
            interp = create_interpreter(path, self.backend, num_threads=self.num_threads,
                                        delegates=self._delegates)
            in_idx, out_idx = check_model_tensors(interp, spec.input, spec.output, spec.file)
            self._mono = (native_invoke(interp), interp.tensor(in_idx)(), interp.tensor(out_idx)())
        run, inp, out = self._mono
        q = self._prep(image)
        t0 = time.perf_counter_ns()
        np.copyto(inp[0], q)
        run()
        label = int(out[0].argmax())
        latency_ms = (time.perf_counter_ns() - t0) * 1e-6
        return MonolithicResult(label=label, label_name=self.manifest.labels[label], latency_ms=latency_ms)

    def stage_invokers(self) -> list[Callable[[], None]]:
        """Each stage's bare invoke (for benchmarks that time the interpreters without the Runner around them)."""
        return [s.run for s in self._stages]
