"""Step 3 of the conversion pipeline: ONNX -> full-integer int8 .tflite with onnx2tf, calibrated per stage.

Stage 0 (and the monolithic model) are calibrated on the normalized images in NHWC; stage k+1 is calibrated
on stage k's float ``features`` (NHWC) over the same images, so the int8 scale and zero point of a hand-off
come out equal on both sides and the device can pass the raw int8 bytes along.

onnx2tf is run with the ``tf_converter`` backend (its default ``flatbuffer_direct`` backend mis-quantizes
the input of MEAN, i.e. global average pooling), keeps the ONNX output names, and keeps the NHWC shape of
later stages' inputs. Its console output is captured and only shown (in the error) when it fails.

The ONNX file is simplified here, in this process (:func:`simplify_onnx`: the three onnx-simplifier passes onnx2tf
would otherwise run as three ``onnxsim`` subprocesses, each importing onnx and onnxruntime anew: 56 % of the
conversion time of the tiny test network on a 2-core machine), and onnx2tf is told not to run them again.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeexit.errors import ConversionError, clip

from .export import INPUT_NAME, quiet_tool
from ..models.staged import StagedModel

log = logging.getLogger(__name__)

#: Fewer calibration samples than this give unreliable int8 ranges.
MIN_CALIBRATION_SAMPLES = 8


def normalize_images(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 images [N, H, W, C] -> float32 ``(x/255 - mean) / std`` [N, H, W, C]."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def check_calibration_images(model: StagedModel, images: np.ndarray, what: str = "calibration") -> None:
    """Raise UsageError unless ``images`` is uint8 [N, H, W, C] matching the model's input, N >= 8."""
    from edgeexit.errors import UsageError

    c, h, w = model.spec.input_shape
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (h, w, c):
        got = getattr(images, "shape", type(images).__name__)
        raise UsageError(f"{what} images have shape {got}; expected [N, {h}, {w}, {c}] (NHWC uint8) for this "
                         f"model's {c}x{h}x{w} input: resize/convert them or pick a matching dataset")
    if images.dtype != np.uint8:
        raise UsageError(f"{what} images have dtype {images.dtype}; expected uint8 pixels 0..255")
    if len(images) < MIN_CALIBRATION_SAMPLES:
        raise UsageError(f"{what} set has {len(images)} images; at least {MIN_CALIBRATION_SAMPLES} are needed for "
                         "reliable int8 ranges (256 recommended): pass more images")


def stage_inputs(model: StagedModel, images: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """The float input of every stage over ``images``, in the layout of the converted graph (NHWC).

    Returns:
        One float32 array per stage: [N, H, W, C] normalized images for stage 0, then stage k-1's
        features [N, H_k, W_k, C_k] for stage k.
    """
    x_all = normalize_images(images, model.spec.mean, model.spec.std)  # [N, H, W, C]
    per_stage: list[list[np.ndarray]] = [[] for _ in model.stages]
    model = model.eval()
    with torch.no_grad():
        for start in range(0, len(x_all), batch):
            # NCHW with plain strides: a user's head may .view it (.contiguous() keeps 1-channel permuted strides)
            x = torch.from_numpy(x_all[start:start + batch]).permute(0, 3, 1, 2).clone(
                memory_format=torch.contiguous_format)
            per_stage[0].append(x_all[start:start + batch])
            for i, (features, _) in enumerate(model.iter_stages(x)):
                if i + 1 < len(per_stage):
                    per_stage[i + 1].append(features.permute(0, 2, 3, 1).numpy())
    return [np.ascontiguousarray(np.concatenate(chunks).astype(np.float32)) for chunks in per_stage]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failure_summary(name: str, log_text: str, exc: BaseException, activations: str = "int8") -> str:
    """One line naming the ONNX op/layer onnx2tf failed on, and why, from its console output."""
    text = _ANSI.sub("", log_text)
    op = None
    for pattern in (r"onnx_op_type:\s*(\S+)", r"OP Type:\s*(\S+)"):
        found = re.findall(pattern, text)
        if found:
            op = found[-1]
            break
    layer = re.findall(r"onnx_op_name:\s*(\S+)", text)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    errors = [ln.strip() for ln in text.splitlines() if "ERROR" in ln or "Error" in ln]
    if errors:
        reason = errors[-1] if not str(exc).strip() else reason
    where = f"layer {layer[-1]} (ONNX op {op})" if layer and op else (f"ONNX op {op}" if op else "the graph")
    kind = "int8" if activations == "int8" else "int16-activation (16x8)"
    return (f"{name}: onnx2tf cannot convert {where} to {kind} TFLite: {clip(reason)}; replace the layer with "
            "standard conv/linear/pool/activation layers")


#: The onnx2tf file of each activation type (:data:`edgeexit.runtime.manifest.ACTIVATIONS`): int8 (int8 weights
#: and activations), or int16 (TFLite "16x8": int8 weights, int16 activations, int16 input and outputs).
_PRODUCED = {"int8": "*_full_integer_quant.tflite", "int16": "*_full_integer_quant_with_int16_act.tflite"}


#: onnx-simplifier passes, as onnx2tf runs them ("to fully optimize the model, run onnxsim three times in a row").
SIMPLIFY_PASSES = 3


def simplify_onnx(onnx_path: Path) -> None:
    """Simplify the ONNX file in place with onnx-simplifier (constant folding, shape inference, op fusion): what
    onnx2tf does before converting, in-process. A model it cannot simplify is converted as it is (as onnx2tf does)."""
    import onnx
    import onnxsim

    try:
        model = onnx.load(str(onnx_path))
        for _ in range(SIMPLIFY_PASSES):
            model, _ok = onnxsim.simplify(model)
        onnx.save(model, str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - onnxsim raises anything; the unsimplified model still converts
        log.debug("onnx-simplifier could not simplify %s (%s: %s); converting it as it is", onnx_path.name,
                  type(exc).__name__, clip(str(exc), 200))


def onnx_to_int8_tflite(name: str, onnx_path: Path, calibration: np.ndarray, out_path: Path,
                        keep_nhwc_input: bool, activations: str = "int8", keep_saved_model: Path | None = None) -> Path:
    """Convert one ONNX file into a full-integer .tflite: int8 (int8 input and outputs), or with
    ``activations="int16"`` the 16x8 file onnx2tf writes from the same calibration (int16 input and outputs).

    Args:
        name: unit name for messages ("stage_1").
        onnx_path: the exported ONNX file (one input named ``input``).
        calibration: float32 [N, H, W, C] inputs in the converted (NHWC) layout, already normalized.
        out_path: where to put the .tflite.
        keep_nhwc_input: True for later stages, whose ONNX input is already NHWC.
        activations: "int8" or "int16" (:data:`edgeexit.runtime.manifest.ACTIVATIONS`).
        keep_saved_model: where to keep onnx2tf's output folder (its TensorFlow saved model, from which
            :mod:`.precision` quantizes the unit again); None drops it.

    Raises:
        ConversionError: onnx2tf fails or produces no int8 model, naming the failing layer when it can.
    """
    import onnx2tf  # heavy: TensorFlow

    channels = calibration.shape[-1]
    simplify_onnx(onnx_path)
    with tempfile.TemporaryDirectory(prefix=f"edgeexit-{name}-") as tmp:
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calibration)
        zeros = np.zeros((1, 1, 1, channels), np.float32)
        ones = np.ones((1, 1, 1, channels), np.float32)
        out_dir = Path(tmp) / "tf"
        with quiet_tool() as captured:
            try:
                onnx2tf.convert(
                    input_onnx_file_path=str(onnx_path), output_folder_path=str(out_dir),
                    output_integer_quantized_tflite=True, tflite_backend="tf_converter",
                    custom_input_op_name_np_data_path=[[INPUT_NAME, str(calib_path), zeros, ones]],
                    input_quant_dtype="int8", output_quant_dtype="int8",
                    copy_onnx_input_output_names_to_tflite=True,
                    keep_shape_absolutely_input_names=[INPUT_NAME] if keep_nhwc_input else None,
                    not_use_onnxsim=True, non_verbose=True, verbosity="error")
                error: BaseException | None = None
            except (Exception, SystemExit) as exc:  # onnx2tf raises anything, or calls sys.exit on errors
                error = exc
        if error is not None:
            log.debug("onnx2tf output for %s:\n%s", name, captured.getvalue())
            raise ConversionError(_failure_summary(name, captured.getvalue(), error, activations)) from None
        pattern = _PRODUCED[activations]
        produced = sorted(out_dir.glob(pattern))
        if not produced:
            log.debug("onnx2tf output for %s:\n%s", name, captured.getvalue())
            raise ConversionError(_failure_summary(name, captured.getvalue(),
                                                   RuntimeError(f"no {pattern} was produced"), activations))
        shutil.copyfile(produced[0], out_path)
        if keep_saved_model is not None:
            shutil.move(str(out_dir), str(keep_saved_model))
    return out_path
