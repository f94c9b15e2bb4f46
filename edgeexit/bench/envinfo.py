"""The machine a measurement was taken on, recorded beside every benchmark result.

Everything is read from files (``/proc``, ``/sys``, ``/etc``) and the standard library, so it works on a
Raspberry Pi, a Coral board or a workstation without extra packages. Files that are missing or unreadable
give ``None`` (a container has no CPU governor, an x86 PC has no device-tree model); nothing here raises.
The paths are fields of :class:`EnvPaths` so tests can point them at a fake ``/proc`` and ``/sys``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Interpreter distributions the runtime can use, in the order it prefers them (see edgeexit.runtime.interpreter).
INTERPRETER_DISTRIBUTIONS = ("ai-edge-litert", "tflite-runtime", "tensorflow", "tensorflow-cpu")


@dataclass(frozen=True)
class EnvPaths:
    """Where the machine description is read from (overridable for tests)."""

    device_tree_model: Path = Path("/proc/device-tree/model")
    cpuinfo: Path = Path("/proc/cpuinfo")
    os_release: Path = Path("/etc/os-release")
    governor: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    cur_freq: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    thermal: Path = Path("/sys/class/thermal")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def board_model(paths: EnvPaths = EnvPaths()) -> str | None:
    """The board's model string from the device tree (e.g. "Raspberry Pi 4 Model B Rev 1.4"), or None."""
    return _read(paths.device_tree_model)


def cpu_model(paths: EnvPaths = EnvPaths()) -> str | None:
    """The CPU model from /proc/cpuinfo ("model name", or "Hardware"/"CPU part" on some ARM kernels)."""
    text = _read(paths.cpuinfo)
    if text is None:
        return None
    fields = _first_cpu_fields(text)
    for key in ("model name", "Model", "Hardware", "Processor", "cpu model"):
        if key in fields:
            return fields[key]
    if "CPU part" in fields:
        return f"{fields.get('CPU implementer', '?')}/{fields['CPU part']} (ARM implementer/part)"
    return None


#: CPU flags that change int8 kernel speed (x86: AVX2, AVX-512 VNNI, AVX-VNNI, AMX; Arm: dot product, i8mm, SVE):
#: the same CPU name can hide an 8x difference (see :func:`int8_features`).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve", "sve2")


def int8_features(paths: EnvPaths = EnvPaths()) -> tuple[str, ...]:
    """The int8-relevant flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm), in
    :data:`INT8_FLAGS` order; empty when unreadable."""
    text = _read(paths.cpuinfo)
    if text is None:
        return ()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            have = set(value.split())
            return tuple(f for f in INT8_FLAGS if f in have)
    return ()


#: Arm's own core designs ("CPU implementer" 0x41) by "CPU part", for the boards edgeexit targets and their kin.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78"}


def _first_cpu_fields(text: str) -> dict[str, str]:
    """The "key: value" fields of the first processor block of /proc/cpuinfo (later duplicates ignored)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields and value.strip():
            fields[key.strip()] = value.strip()
    return fields


def cpu_family(paths: EnvPaths = EnvPaths()) -> str | None:
    """The CPU's family, which the model name often hides ("AMD EPYC" names several generations).

    x86: vendor, family, model and stepping as the kernel reports them ("AuthenticAMD family 25 model 17
    stepping 1"); Arm: implementer, part (with Arm's core name where known), variant and revision ("Arm
    implementer 0x41 part 0xd08 (Cortex-A72) r0p3"). None when /proc/cpuinfo has neither.
    """
    text = _read(paths.cpuinfo)
    if text is None:
        return None
    f = _first_cpu_fields(text)
    if "cpu family" in f:
        parts = [f.get("vendor_id", "x86"), f"family {f['cpu family']}"]
        parts += [f"{k} {f[k]}" for k in ("model", "stepping") if k in f]
        return " ".join(parts)
    if "CPU part" in f:
        part = f["CPU part"].lower()
        name = ARM_PARTS.get(part) if f.get("CPU implementer", "").lower() == "0x41" else None
        family = f"Arm implementer {f.get('CPU implementer', '?')} part {part}" + (f" ({name})" if name else "")
        variant, revision = f.get("CPU variant"), f.get("CPU revision")
        if variant and revision:
            try:
                family += f" r{int(variant, 16)}p{int(revision)}"
            except ValueError:
                pass
        return family
    return None


def cpu_summary(env: dict[str, Any]) -> str:
    """One line naming a recorded machine's CPU: "AMD EPYC (AuthenticAMD family 25 model 17 stepping 1;
    int8: avx2 avx512f avx512_vnni)". Older records without family or features say so."""
    cpu = env.get("cpu") or env.get("machine") or "unknown CPU"
    family = env.get("cpu_family") or "family not recorded"
    features = env.get("int8_features")
    flags = "int8 features not recorded" if features is None else f"int8: {' '.join(features) or 'none'}"
    return f"{cpu} ({family}; {flags})"


def machine_stamp(paths: EnvPaths = EnvPaths()) -> dict[str, Any]:
    """Who timed a measurement: {"machine": board or CPU model, "cpu": CPU model, "int8_features": [...]}."""
    board, cpu = board_model(paths), cpu_model(paths)
    return {"machine": board or cpu or platform.machine() or "unknown", "cpu": cpu,
            "int8_features": list(int8_features(paths))}


def os_name(paths: EnvPaths = EnvPaths()) -> str | None:
    """PRETTY_NAME from /etc/os-release (e.g. "Debian GNU/Linux 12 (bookworm)"), or None."""
    text = _read(paths.os_release)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"') or None
    return None


def temperatures_c(paths: EnvPaths = EnvPaths()) -> dict[str, float]:
    """Readable thermal zones as {zone type (or zone name): degrees Celsius}; empty if none are readable."""
    out: dict[str, float] = {}
    try:
        zones = sorted(p for p in paths.thermal.glob("thermal_zone*") if p.is_dir())
    except OSError:
        return out
    for zone in zones:
        raw = _read(zone / "temp")
        if raw is None or not re.fullmatch(r"-?\d+", raw):
            continue
        name = _read(zone / "type") or zone.name
        if name in out:
            name = f"{name}/{zone.name}"
        out[name] = int(raw) / 1000.0  # the kernel reports millidegrees
    return out


def interpreter_package() -> dict[str, str | None]:
    """Installed TFLite interpreter distributions and their versions (None where not installed)."""
    found: dict[str, str | None] = {}
    for dist in INTERPRETER_DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_environment(*, num_threads: int | None = None, backend: str | None = None,
                        paths: EnvPaths = EnvPaths()) -> dict[str, Any]:
    """Describe this machine for a benchmark record.

    Args:
        num_threads: interpreter threads used by the measurement.
        backend: the interpreter backend the runtime actually loaded (e.g. "ai_edge_litert"), if known.
        paths: where to read the machine description (tests pass a fake tree).

    Returns:
        A JSON-able dict: board, cpu, cpu_family (:func:`cpu_family`), int8_features (:func:`int8_features`:
        the CPU flags that decide int8 kernel speed), machine (board or cpu, whichever is known), os, kernel,
        arch, python, numpy, edgeexit version, interpreter backend and installed interpreter packages, threads,
        CPU count, governor, current CPU frequency (kHz), temperatures (deg C).
    """
    from .. import __version__

    freq = _read(paths.cur_freq)
    board, cpu = board_model(paths), cpu_model(paths)
    packages = interpreter_package()
    return {
        "board": board,
        "cpu": cpu,
        "cpu_family": cpu_family(paths),
        "int8_features": list(int8_features(paths)),
        "machine": board or cpu or platform.machine() or "unknown",
        "os": os_name(paths),
        "kernel": platform.release() or None,
        "arch": platform.machine() or None,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "pillow": _distribution_version("Pillow"),
        "edgeexit": __version__,
        "interpreter_backend": backend,
        "interpreter_packages": {k: v for k, v in packages.items() if v is not None},
        "threads": num_threads,
        "cpu_count": os.cpu_count(),
        "governor": _read(paths.governor),
        "cpu_freq_khz": int(freq) if freq is not None and freq.isdigit() else None,
        "temperature_c": temperatures_c(paths),
        "executable": sys.executable,
    }


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe, lower-case version of ``text`` ("Raspberry Pi 4 Model B" -> "raspberry-pi-4-model-b")."""
    s = re.sub(r"\((r|tm|c)\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:max_len].strip("-") or "unknown"
