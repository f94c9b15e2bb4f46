"""MACs and parameter bytes counted on converted .tflite graphs (edgeexit.runtime.tflite) against torch counts."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.runtime.tflite import file_costs
from edgeexit.runtime.manifest import MANIFEST_FILE, Manifest

pytest.importorskip("onnx2tf")
pytestmark = pytest.mark.workstation


def _manifest(bundle) -> Manifest:
    return Manifest.from_json((bundle / MANIFEST_FILE).read_text())


def test_stage_macs_equal_torch_counts(tiny_bundle, tiny_model):
    from edgeexit.workstation.models.costs import model_costs

    torch_costs = model_costs(tiny_model)
    for i, stage in enumerate(_manifest(tiny_bundle).stages):
        g = file_costs(tiny_bundle / stage.file)
        assert (g.segment_macs, g.head_macs) == (torch_costs.segment_macs[i], torch_costs.head_macs[i])
        assert (stage.costs.segment_macs, stage.costs.head_macs) == (g.segment_macs, g.head_macs)
        assert (stage.costs.torch_segment_macs, stage.costs.torch_head_macs) == (g.segment_macs, g.head_macs)
        assert set(g.mac_ops) == {"CONV_2D", "FULLY_CONNECTED"}


def test_full_macs_is_every_segment_plus_the_whole_final_head(tiny_bundle, tiny_model):
    from edgeexit.workstation.models.costs import model_costs

    m = _manifest(tiny_bundle)
    final = file_costs(tiny_bundle / m.stages[-1].file)
    head = tiny_model.stages[-1].head
    # one definition of full_macs: the network without early exits = every segment + the whole final head,
    # the same on the graphs (manifest) and in torch (ModelCosts)
    assert m.full_macs == sum(s.costs.segment_macs for s in m.stages) + m.stages[-1].costs.head_macs
    assert m.full_macs == model_costs(tiny_model).full_macs
    # the monolithic graph has no confidence output: the final head's classifier only
    assert final.head_output_macs["logits"] == head.classifier.in_features * head.classifier.out_features
    assert final.head_output_macs["confidence"] == head.confidence.in_features
    assert final.head_output_macs["features"] == 0
    assert m.monolithic.macs == m.full_macs - head.confidence.in_features
    assert file_costs(tiny_bundle / m.monolithic.file, boundary=None).macs == m.monolithic.macs


def test_param_bytes_split_between_segment_and_head(tiny_bundle, tiny_model):
    m = _manifest(tiny_bundle)
    for i, stage in enumerate(m.stages):
        g = file_costs(tiny_bundle / stage.file)
        assert g.segment_param_bytes + g.head_param_bytes == g.param_bytes
        head = tiny_model.stages[i].head
        c, k = head.classifier.in_features, head.classifier.out_features
        int8_weights = c * k + c          # classifier + confidence weights, one byte each
        int32_biases = 4 * (k + 1)
        # the head holds its weights and biases plus at most a few bytes of op constants (MEAN axes)
        assert int8_weights + int32_biases <= g.head_param_bytes <= int8_weights + int32_biases + 16
        conv = tiny_model.stages[i].segment[0][0]
        assert g.segment_param_bytes >= conv.weight.numel()  # int8 conv weights (BatchNorm folded in)
    assert m.monolithic.param_bytes < sum(s.costs.segment_param_bytes + s.costs.head_param_bytes for s in m.stages)


def test_without_boundary_everything_is_segment(tiny_bundle):
    stage = _manifest(tiny_bundle).stages[0]
    g = file_costs(tiny_bundle / stage.file, boundary=None)
    assert g.head_macs == 0 and g.head_param_bytes == 0
    assert g.segment_macs == stage.costs.segment_macs + stage.costs.head_macs


@pytest.mark.slow  # a real conversion: 136 s on the shared 2-core machine under load
def test_depthwise_convolution_macs(tmp_path):
    from edgeexit.workstation.conversion.pipeline import convert_unit
    from edgeexit.workstation.models.costs import count_macs
    from edgeexit.workstation.conversion.export import split_stages
    from edgeexit.workstation.conversion.quantize import stage_inputs
    from tinymodels import synthetic_digits, tiny_staged_model

    model = tiny_staged_model(seed=2, widths=(4, 8), depthwise=True)
    calib, _ = synthetic_digits(16, seed=3)
    unit = split_stages(model)[1]  # conv + depthwise conv, NHWC input
    path = convert_unit(unit, stage_inputs(model, calib)[1], tmp_path, tmp_path / "stage_1.tflite")
    g = file_costs(path)
    x = model.stages[0].segment(model.example_input(1))
    seg_macs, features = count_macs(model.stages[1].segment, x)
    head_macs, _ = count_macs(model.stages[1].head, features)
    assert g.mac_ops["DEPTHWISE_CONV_2D"] == 8 * 14 * 14 * 3 * 3
    assert (g.segment_macs, g.head_macs) == (seg_macs, head_macs)
    assert np.isclose(g.macs, seg_macs + head_macs)
