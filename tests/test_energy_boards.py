"""Energy estimates and board detection against a fake sysfs tree and fake device-tree model files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeexit import Runner, UsageError
from edgeexit.energy.boards import BOARDS, detect_board, get_board
from edgeexit.energy.proxy import DRAM_PJ_PER_BYTE, INT8_MAC_PJ, find_power_sensor, stage_ops_mj


def _hwmon(root: Path, n: int, name: str, files: dict[str, str]) -> Path:
    d = root / f"hwmon{n}"
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    for f, v in files.items():
        (d / f).write_text(v + "\n")
    return d


def _model(tmp_path: Path, text: str) -> str:
    p = tmp_path / "model"
    p.write_bytes(text.encode() + b"\0")
    return str(p)


@pytest.mark.parametrize("model, edgetpu, board", [
    ("Raspberry Pi 4 Model B Rev 1.4", False, "rpi4"),
    ("Raspberry Pi 4 Model B Rev 1.5", True, "coral-usb-rpi4"),
    ("Raspberry Pi 5 Model B Rev 1.0", False, "rpi5"),
    ("Freescale i.MX8MQ Phanbell", False, "coral-dev"),
    ("Some Other Board", False, "generic"),
], ids=["pi4", "pi4-coral-usb", "pi5", "coral-dev", "unknown"])
def test_board_detection_from_device_tree(tmp_path, model, edgetpu, board):
    assert detect_board(_model(tmp_path, model), edgetpu=edgetpu).name == board


def test_board_profiles_and_names(tmp_path):
    assert detect_board(str(tmp_path / "missing")).name == "generic"
    assert get_board("rpi5") is BOARDS["rpi5"]
    with pytest.raises(UsageError, match="unknown board"):
        get_board("pi9")
    for b in BOARDS.values():
        assert 0 < b.idle_w <= b.active_w and b.source


def test_power_sensor_power_input(tmp_path):
    _hwmon(tmp_path, 0, "cpu_thermal", {"temp1_input": "45000"})
    _hwmon(tmp_path, 1, "ina260", {"power1_input": "3250000"})  # microwatts
    sensor = find_power_sensor(str(tmp_path))
    assert sensor is not None and sensor.name == "ina260"
    assert sensor.read_watts() == pytest.approx(3.25)


def test_power_sensor_current_voltage_pair(tmp_path):
    _hwmon(tmp_path, 0, "ina219", {"curr1_input": "800", "in1_input": "5100", "in0_input": "12"})  # mA, mV
    sensor = find_power_sensor(str(tmp_path))
    assert sensor is not None and sensor.read_watts() == pytest.approx(0.8 * 5.1)


def test_no_power_sensor(tmp_path):
    _hwmon(tmp_path, 0, "cpu_thermal", {"temp1_input": "45000"})
    assert find_power_sensor(str(tmp_path)) is None
    assert find_power_sensor(str(tmp_path / "none")) is None


def _image(runner):
    h, w = runner.manifest.preprocessing.size
    return np.full((h, w, runner.manifest.preprocessing.channels), 128, np.uint8)


def test_runner_energy_with_measured_sensor(bundle_dir, tmp_path):
    _hwmon(tmp_path / "hwmon", 0, "ina260", {"power1_input": "4000000"})
    runner = Runner(bundle_dir, power_sensor=str(tmp_path / "hwmon"),
                    device_tree_model=_model(tmp_path, "Raspberry Pi 4 Model B Rev 1.4"))
    r = runner(_image(runner))
    assert runner.board.name == "rpi4"
    assert r.energy.board_mj == pytest.approx(r.latency_ms * 5.4)  # W x ms = mJ
    assert runner.sensor is not None and "ina260" in runner.sensor.description
    # a sensor updating every few ms cannot measure one inference: no per-call figure, and the result says why
    assert r.energy.measured_mj is None and "bench" in r.energy.measured_source
    assert "Raspberry Pi 4" in r.energy.board_source and r.energy.best_mj == r.energy.board_mj


def test_runner_energy_without_sensor_says_so(bundle_dir, tmp_path):
    runner = Runner(bundle_dir, power_sensor=str(tmp_path / "empty"), board="rpi5")
    r = runner(_image(runner))
    assert r.energy.measured_mj is None and r.energy.best_mj == r.energy.board_mj
    assert "no power sensor" in r.energy.measured_source and "board-profile estimate" in r.energy.measured_source


def test_ops_energy_grows_with_each_exit(bundle_dir):
    from edgeexit.runtime.rules import FixedExitRule

    runner = Runner(bundle_dir, power_sensor=None, board="generic")
    ops = [runner.set_rule(FixedExitRule(k)) or runner(_image(runner)).energy.ops_mj for k in range(runner.num_exits)]
    assert all(a < b for a, b in zip(ops, ops[1:]))
    s = runner.manifest.stages[0]
    at_least = ((s.costs.segment_macs + s.costs.head_macs) * INT8_MAC_PJ
                + (s.costs.segment_param_bytes + s.costs.head_param_bytes) * DRAM_PJ_PER_BYTE) * 1e-9
    assert ops[0] == pytest.approx(stage_ops_mj(s)) and ops[0] > at_least
