"""Operation-proxy energy per exit before and after the cache rule, for converted bundles.

Usage: python benchmarks/energy_proxy.py NAME=BUNDLE_DIR [NAME=BUNDLE_DIR ...] [--out FILE]

"Before" is the rule without a cache (every weight byte read from DRAM on every inference; the ``generic``
board); "after" is the cache rule of :mod:`edgeexit.energy.proxy` with each board profile's last-level cache.
Only the manifests are read (costs and tensor shapes counted on the converted graphs); nothing is timed.
Writes benchmarks/results/energy_proxy.json by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeexit.energy import BOARDS  # noqa: E402
from edgeexit.energy.proxy import (CONSTANTS_SOURCE, monolithic_cost, sram_weight_fraction, stage_costs,  # noqa: E402
                                   working_set)
from edgeexit.runtime.bundle import read_manifest  # noqa: E402
from verified import add_option, require_verified  # noqa: E402

BOARD_NAMES = ("generic", "rpi4", "rpi5", "coral-dev")


def _uj(x_mj: float) -> float:
    return round(x_mj * 1e3, 4)


def breakdown(cost) -> dict[str, float]:
    """A ProxyCost in microjoules by part."""
    return {"macs_uj": round(cost.mac_pj * 1e-6, 4), "int32_adds_uj": round(cost.add_pj * 1e-6, 4),
            "activations_uj": round(cost.activation_pj * 1e-6, 4),
            "weights_sram_uj": round(cost.weight_sram_pj * 1e-6, 4),
            "weights_dram_uj": round(cost.weight_dram_pj * 1e-6, 4), "total_uj": _uj(cost.total_mj)}


def bundle_proxies(path: str) -> dict:
    manifest = read_manifest(path)[1]
    weights, acts = working_set(manifest)
    out = {"bundle": manifest.name, "path": path, "num_exits": manifest.num_exits,
           "working_set": {"weight_bytes": weights, "largest_stage_activation_bytes": acts,
                           "monolithic_param_bytes": None if manifest.monolithic is None else
                           manifest.monolithic.param_bytes},
           "boards": {}}
    for name in BOARD_NAMES:
        board = BOARDS[name]
        stages = stage_costs(manifest, board.cache_bytes)
        cum, exits = 0.0, []
        for c in stages:
            cum += c.total_mj
            exits.append(_uj(cum))
        mono = monolithic_cost(manifest, board.cache_bytes)
        out["boards"][name] = {
            "rule": "before (no cache: every weight byte from DRAM)" if board.cache_bytes is None else
                    f"after (cache rule, {board.cache_bytes // 1024} KiB last-level cache)",
            "cache_bytes": board.cache_bytes,
            "sram_weight_fraction": round(sram_weight_fraction(weights, acts, board.cache_bytes), 4),
            "exit_uj": exits, "stages": [breakdown(c) for c in stages],
            "monolithic": None if mono is None else breakdown(mono)}
    before, after = out["boards"]["generic"], out["boards"]["rpi4"]
    out["summary"] = {
        "last_exit_uj": {"before": before["exit_uj"][-1], "after_rpi4": after["exit_uj"][-1]},
        "monolithic_uj": None if before["monolithic"] is None else
        {"before": before["monolithic"]["total_uj"], "after_rpi4": after["monolithic"]["total_uj"],
         "before_weights_dram_share": round(before["monolithic"]["weights_dram_uj"] / before["monolithic"]["total_uj"],
                                            4)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", metavar="NAME=BUNDLE_DIR")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "energy_proxy.json"))
    add_option(ap)
    args = ap.parse_args()
    verification = {name: require_verified(path, args.allow_unverified)
                    for name, _, path in (item.partition("=") for item in args.bundles)}
    result = {"constants": CONSTANTS_SOURCE, "unit": "microjoules per input (operation proxy, 45 nm)",
              "cache_rule": "working set = every weight byte of the network + the largest stage-boundary activation "
                            "footprint; weight reads served from SRAM = min(1, (cache - activations) / weights), the "
                            "rest from DRAM; activations from SRAM when they fit; no known cache: all weights DRAM",
              "bundles": {}}
    for item in args.bundles:
        name, _, path = item.partition("=")
        result["bundles"][name] = {**bundle_proxies(path), "verification": verification[name]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, b in result["bundles"].items():
        s = b["summary"]
        print(f"{name}: last exit {s['last_exit_uj']['before']} -> {s['last_exit_uj']['after_rpi4']} uJ (rpi4); "
              f"monolithic {s['monolithic_uj']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
