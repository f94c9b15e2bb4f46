"""Edge TPU readiness of converted stages, and the Edge TPU compiler call (edgeexit.workstation.conversion.edgetpu).

The compiler and the hardware are not needed: the readiness report reads the real converted .tflite files;
the compile step is checked for its missing-compiler message and, with a stand-in executable that records
its arguments, for calling the compiler ONCE over all stages (so they share the on-chip parameter cache).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeexit.workstation.conversion.edgetpu import SUPPORTED_OPS, compile_for_edgetpu, edgetpu_report, stage_report
from edgeexit.errors import BundleError, ConversionError
from edgeexit.runtime.manifest import MANIFEST_FILE, Manifest


@pytest.fixture(scope="module")
def manifest(bundle_dir) -> Manifest:
    return Manifest.from_json((bundle_dir / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def report(bundle_dir, manifest) -> dict:
    return edgetpu_report([bundle_dir / s.file for s in manifest.stages])


def test_converted_stages_are_full_int8_static_single_graph(report, manifest):
    assert [s["file"] for s in report["stages"]] == [s.file for s in manifest.stages]
    for st in report["stages"]:
        assert st["full_int8"], st
        assert st["static_shapes"], st
        assert st["subgraphs"] == 1
        assert st["ops"] == sum(st["op_counts"].values()) > 0
        assert st["op_counts"].get("CONV_2D", 0) >= 1


def test_converted_stages_map_entirely_to_the_edge_tpu(report):
    # The converter's stages (conv, relu, mean, fully connected, int8 hand-offs) use only Edge TPU ops.
    for st in report["stages"]:
        assert st["unsupported"] == [], st["unsupported"]
        assert (st["first_cpu_op"], st["cpu_ops"], st["edgetpu_ops"]) == (None, 0, st["ops"])
        assert set(st["op_counts"]) <= set(SUPPORTED_OPS)
    assert report["ready"] is True


def test_report_fits_the_manifest_edgetpu_field(report, manifest):
    again = Manifest.from_json(manifest.replace(edgetpu=report).to_json())
    assert json.loads(json.dumps(again.edgetpu)) == json.loads(json.dumps(report))


def test_missing_compiler_says_what_to_install(bundle_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"'no-such-edgetpu_compiler' not found on PATH; .*apt-get install "
                                              r"edgetpu-compiler"):
        compile_for_edgetpu(bundle_dir, compiler="no-such-edgetpu_compiler", out_dir=tmp_path)


STAND_IN = r'''#!{python}
# Stand-in for edgetpu_compiler: records its arguments and writes what the compiler writes.
import json, pathlib, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("Edge TPU Compiler version stand-in"); sys.exit(0)
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\n")
out = pathlib.Path(args[args.index("-o") + 1])
for i, model in enumerate(a for a in args if a.endswith(".tflite")):
    stem = pathlib.Path(model).stem
    (out / (stem + "_edgetpu.tflite")).write_bytes(pathlib.Path(model).read_bytes())
    print("Input model: " + model)
    print("Number of operations that will run on Edge TPU: " + str(5 + i))
    print("Number of operations that will run on CPU: 0")
'''


def test_compiles_all_stages_in_one_call(bundle_dir, manifest, tmp_path):
    calls = tmp_path / "calls.jsonl"
    exe = tmp_path / "edgetpu_compiler"
    exe.write_text(STAND_IN.format(python=sys.executable, calls=str(calls)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "compiled"
    result = compile_for_edgetpu(bundle_dir, compiler=str(exe), out_dir=out, bundle_out=tmp_path / "tpu")
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    stages = [str(bundle_dir / s.file) for s in manifest.stages]
    assert recorded == [["-s", "-o", str(out)] + stages]  # ONE call, every stage, in order
    assert [Path(f).name for f in result["files"]] == [Path(s).stem + "_edgetpu.tflite" for s in stages]
    assert result["per_stage"] == {Path(s).name: {"edgetpu_ops": 5 + i, "cpu_ops": 0} for i, s in enumerate(stages)}
    assert result["version"] == "Edge TPU Compiler version stand-in"
    assert (out / "edgetpu_compiler.log").is_file()
    assert result["readiness"]["ready"] is True
    # the Edge TPU bundle: same manifest, compiled stage files (hashes match), report recorded
    from edgeexit.runtime.bundle import load_bundle
    tpu = load_bundle(tmp_path / "tpu", check_tensors=False)
    assert [s.file for s in tpu.manifest.stages] == [s.file for s in manifest.stages]
    assert tpu.manifest.edgetpu["compiled"] is True
    assert tpu.manifest.edgetpu["per_stage"] == result["per_stage"]
    # the stage files in the new bundle are the compiler's output files, byte for byte (not the inputs)
    for s, f in zip(tpu.manifest.stages, result["files"]):
        assert (tmp_path / "tpu" / s.file).read_bytes() == Path(f).read_bytes()
    # the stand-in's "compiled" files are the CPU models, so the new bundle must answer exactly as the original
    from edgeexit.runtime.runner import Runner
    h, w = manifest.preprocessing.size
    images = np.random.default_rng(0).integers(0, 256, (8, h, w, manifest.preprocessing.channels), dtype=np.uint8)
    before, after = Runner(bundle_dir, power_sensor=None), Runner(tmp_path / "tpu", power_sensor=None)
    assert [(r.label, r.exit_index) for r in map(before, images)] == [(r.label, r.exit_index) for r in map(after, images)]


def test_not_a_tflite_file_is_a_bundle_error(tmp_path):
    bad = tmp_path / "stage_0.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(BundleError, match="stage_0.tflite"):
        stage_report(bad)
    with pytest.raises(BundleError, match="no such .tflite file"):
        stage_report(tmp_path / "missing.tflite")


# ---- graphs the converter never makes: an op the Edge TPU lacks, and a float model (needs TensorFlow) --------
@pytest.fixture(scope="module")
def keras_tflite(tmp_path_factory) -> dict[str, Path]:
    tf = pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("keras_tflite")
    files = {}
    for name, leaky, int8 in (("leaky_int8", True, True), ("float", False, False)):
        tf.keras.utils.set_random_seed(0)
        inp = tf.keras.Input((8, 8, 3), batch_size=1)
        x = tf.keras.layers.Conv2D(4, 3)(inp)
        x = tf.keras.layers.LeakyReLU(0.1)(x) if leaky else tf.keras.layers.ReLU()(x)
        x = tf.keras.layers.Conv2D(4, 1)(x)
        x = tf.keras.layers.GlobalAveragePooling2D()(x)
        conv = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, tf.keras.layers.Dense(3)(x)))
        if int8:
            rng = np.random.default_rng(0)
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([rng.standard_normal((1, 8, 8, 3), dtype=np.float32)]
                                                   for _ in range(8))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = tf.int8
        files[name] = out / f"{name}.tflite"
        files[name].write_bytes(conv.convert())
    return files


@pytest.mark.workstation
def test_unsupported_op_and_everything_after_it_run_on_cpu(keras_tflite):
    st = stage_report(keras_tflite["leaky_int8"])
    names = list(st["op_counts"])
    assert st["full_int8"] and "LEAKY_RELU" in names
    assert [u["op"] for u in st["unsupported"]] == ["LEAKY_RELU"]
    first = st["unsupported"][0]["index"]
    assert st["first_cpu_op"] == first == 1  # CONV_2D maps, LEAKY_RELU does not
    assert (st["edgetpu_ops"], st["cpu_ops"]) == (first, st["ops"] - first)
    assert "not an Edge TPU operation" in st["unsupported"][0]["reasons"][0]
    assert edgetpu_report([keras_tflite["leaky_int8"]])["ready"] is False


@pytest.mark.workstation
def test_float_model_is_not_full_int8(keras_tflite):
    st = stage_report(keras_tflite["float"])
    assert st["full_int8"] is False
    assert st["first_cpu_op"] == 0 and st["edgetpu_ops"] == 0
    assert any("FLOAT32, not int8/uint8" in r for r in st["unsupported"][0]["reasons"])
