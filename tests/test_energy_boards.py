"""Board profiles and detection, hwmon sensors, the operation proxy's cache rule and the EnergyModel's kinds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgeexit import UsageError
from edgeexit.energy import BOARDS, EnergyModel, detect_board, get_board
from edgeexit.energy.boards import MIB
from edgeexit.energy.proxy import (DRAM_PJ_PER_BYTE, INT8_MAC_PJ, INT32_ADD_PJ, SRAM_PJ_PER_BYTE, stages_proxy_mj,
                                   working_set)
from edgeexit.energy.sources import find_power_sensor
from edgeexit.runtime.manifest import Manifest

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


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


def test_board_profiles_state_one_idle_and_one_active_figure_with_load_and_source(tmp_path):
    assert detect_board(str(tmp_path / "missing")).name == "generic"
    assert get_board("rpi5") is BOARDS["rpi5"]
    with pytest.raises(UsageError, match="unknown board"):
        get_board("pi9")
    for b in BOARDS.values():
        assert 0 < b.idle_w < b.active_w
        assert b.idle.load and b.idle.source and b.active.load and b.active.source and b.cache_source
    # the same Raspberry Pi 4 idles at the same power in every profile built on it
    assert BOARDS["rpi4"].idle == BOARDS["coral-usb-rpi4"].idle
    assert BOARDS["rpi4"].cache_bytes == MIB and BOARDS["generic"].cache_bytes is None


def test_power_sensor_power_input_and_update_interval(tmp_path):
    _hwmon(tmp_path, 0, "cpu_thermal", {"temp1_input": "45000"})
    _hwmon(tmp_path, 1, "ina260", {"power1_input": "3250000", "update_interval": "4"})  # microwatts, ms
    sensor = find_power_sensor(str(tmp_path))
    assert sensor is not None and sensor.name == "ina260"
    assert sensor.read_watts() == pytest.approx(3.25) and sensor.period_s == pytest.approx(0.004)
    assert "update_interval 4 ms" in sensor.description


def test_power_sensor_current_voltage_pair(tmp_path):
    _hwmon(tmp_path, 0, "ina219", {"curr1_input": "800", "in1_input": "5100", "in0_input": "12"})  # mA, mV
    sensor = find_power_sensor(str(tmp_path))
    assert sensor is not None and sensor.read_watts() == pytest.approx(0.8 * 5.1)


def test_no_power_sensor(tmp_path):
    _hwmon(tmp_path, 0, "cpu_thermal", {"temp1_input": "45000"})
    assert find_power_sensor(str(tmp_path)) is None
    assert find_power_sensor(str(tmp_path / "none")) is None


def _manifest(bundle_dir) -> Manifest:
    return Manifest.from_json((Path(bundle_dir) / "manifest.json").read_text())


def _by_hand(manifest: Manifest, weight_pj_per_byte: float) -> list[float]:
    out = []
    for s in manifest.stages:
        act_in = 1
        for d in s.input.shape:
            act_in *= d
        act_out = 0
        for t in s.outputs.values():
            n = 1
            for d in t.shape:
                n *= d
            act_out += n
        c = s.costs
        out.append(((c.segment_macs + c.head_macs) * INT8_MAC_PJ + act_out * INT32_ADD_PJ
                    + (act_in + act_out) * SRAM_PJ_PER_BYTE
                    + (c.segment_param_bytes + c.head_param_bytes) * weight_pj_per_byte) * 1e-9)
    return out


def test_proxy_cache_rule(bundle_dir):
    m = _manifest(bundle_dir)
    weights, acts = working_set(m)
    # no known cache: every weight byte from DRAM (the rule before the cache rule)
    assert stages_proxy_mj(m, BOARDS["generic"]) == pytest.approx(_by_hand(m, DRAM_PJ_PER_BYTE))
    # the bundle fits in a Pi 4's 1 MiB L2: every weight byte from SRAM
    assert weights + acts < MIB
    assert stages_proxy_mj(m, BOARDS["rpi4"]) == pytest.approx(_by_hand(m, SRAM_PJ_PER_BYTE))
    # a cache that holds the activations and half the weights: half the weight reads from DRAM
    half = dataclasses.replace(BOARDS["rpi4"], cache_bytes=acts + weights // 2)
    mixed = _by_hand(m, 0.5 * (SRAM_PJ_PER_BYTE + DRAM_PJ_PER_BYTE))
    assert stages_proxy_mj(m, half) == pytest.approx(mixed, rel=1e-3)


def test_energy_model_kinds(bundle_dir):
    m = _manifest(bundle_dir)
    board = BOARDS["rpi4"]
    model = EnergyModel(m, board)
    e = model.for_exit(1, 0.5)
    assert e.board_estimate_mj == pytest.approx(0.5 * 5.4)                 # ms x W = mJ
    assert e.board_estimate_attributable_mj == pytest.approx(0.5 * (5.4 - 2.2))
    assert e.proxy_mj == pytest.approx(sum(stages_proxy_mj(m, board)[:2]))
    assert e.measured_mj is None and "bench --store-energy" in e.measured_source
    assert model.default_kind() == "proxy"
    assert "100% of weight reads from SRAM" in e.proxy_source and "45 nm" in e.proxy_source
    assert set(e.to_dict()) == {"measured_mj", "measured_attributable_mj", "board_estimate_mj",
                                "board_estimate_attributable_mj", "proxy_mj", "sources"}
    ps = model.proxy_mj
    assert all(a < b for a, b in zip(ps, ps[1:]))


def test_energy_model_uses_measured_figures_stored_for_its_board(bundle_dir):
    m = _manifest(bundle_dir)
    e_exits = m.num_exits
    stored = {"exit_total_mj": [0.1 * (k + 1) for k in range(e_exits)],
              "exit_attributable_mj": [0.02 * (k + 1) for k in range(e_exits)],
              "source": "hwmon ina260", "created": "2026-12-02T10:00:00+00:00"}
    m = Manifest.from_dict({**m.to_dict(), "energy": {"measured": {"rpi4": stored}}})
    on_pi4 = EnergyModel(m, BOARDS["rpi4"]).for_exit(e_exits - 1, 1.0)
    assert on_pi4.measured_mj == pytest.approx(0.1 * e_exits)
    assert on_pi4.measured_attributable_mj == pytest.approx(0.02 * e_exits)
    assert "ina260" in on_pi4.measured_source
    assert EnergyModel(m, BOARDS["rpi4"]).default_kind() == "measured"
    assert EnergyModel(m, BOARDS["rpi5"]).for_exit(0, 1.0).measured_mj is None  # measured on another board


def test_runner_results_carry_every_energy_kind_and_never_read_the_sensor_per_call(bundle_dir, tmp_path):
    import numpy as np

    from edgeexit import Runner
    from edgeexit.runtime.rules import FixedExitRule

    hw = _hwmon(tmp_path / "hwmon", 0, "ina260", {"power1_input": "4000000"})
    runner = Runner(bundle_dir, power_sensor=str(tmp_path / "hwmon"),
                    device_tree_model=_model(tmp_path, "Raspberry Pi 4 Model B Rev 1.4"))
    assert runner.board.name == "rpi4" and runner.sensor is not None and "ina260" in runner.sensor.description
    (hw / "power1_input").unlink()   # a sensor read per call would now fail or change the figures
    h, w = runner.manifest.preprocessing.size
    image = np.full((h, w, runner.manifest.preprocessing.channels), 128, np.uint8)
    proxy = []
    for k in range(runner.num_exits):
        runner.set_rule(FixedExitRule(k))
        r = runner(image)
        e = r.energy
        assert e.board_estimate_mj == pytest.approx(r.latency_ms * 5.4)       # W x ms = mJ
        assert e.board_estimate_attributable_mj == pytest.approx(r.latency_ms * (5.4 - 2.2))
        assert e.measured_mj is None and "bench --store-energy" in e.measured_source
        assert r.to_dict()["energy"]["proxy_mj"] == pytest.approx(e.proxy_mj)
        proxy.append(e.proxy_mj)
    assert proxy == pytest.approx(list(EnergyModel(runner.manifest, BOARDS["rpi4"]).proxy_mj))
