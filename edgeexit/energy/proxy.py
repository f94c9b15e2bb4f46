"""The operation proxy: counted operations and memory traffic times per-operation energies (45 nm figures).

Per-operation energies from Horowitz, "Computing's energy problem", ISSCC 2014, measured at **45 nm, 0.9 V**
(a board's 16-28 nm SoC spends less per operation; the proxy compares exits and networks, it is not what a
board draws: no static power, no OS, no clock tree):

* one int8 multiply-accumulate = int8 multiply 0.2 pJ + int8 add 0.03 pJ -> 0.23 pJ per MAC;
* one int32 add, 0.1 pJ, per output element (bias add / requantization accumulator);
* a byte from on-chip SRAM (cache): 64-bit read from a 1 MB SRAM, 100 pJ -> 12.5 pJ per byte;
* a byte from DRAM: 64-bit DRAM read, low end 1.3 nJ -> 162.5 pJ per byte.

**Cache rule** (memory-aware). A bundle runs the same stages input after input, so whatever stays in the
board's last-level cache between inputs is read from SRAM, not DRAM. The *working set* is every weight byte the
network can read (all stages and heads of the bundle; the monolithic model's parameters for the monolithic
model) plus the largest stage-boundary activation footprint (a stage's input + outputs: a byte a value, two in
int16-activation bundles). Then, per inference:

* activations (a stage's input read once, its outputs written once) come from SRAM when that footprint fits
  in the cache, else from DRAM;
* of the weights, the part that fits in the cache next to the activations, ``min(1, (cache - activations) /
  weights)``, is read from SRAM and the rest from DRAM (misses spread evenly over the weights);
* a board without a known cache (``generic``) keeps every weight byte in DRAM: the pre-cache rule, an
  upper bound.

Only stage-boundary activations are counted (the manifest records no tensors inside a stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .boards import Board

if TYPE_CHECKING:  # the bundle format's types, for annotations only: energy imports no runtime module
    from ..runtime.manifest import Manifest, StageSpec, TensorSpec

INT8_MULT_PJ = 0.2
INT8_ADD_PJ = 0.03
INT8_MAC_PJ = INT8_MULT_PJ + INT8_ADD_PJ
INT32_ADD_PJ = 0.1
SRAM_PJ_PER_BYTE = 100.0 / 8   # 64-bit read from a 1 MB SRAM
DRAM_PJ_PER_BYTE = 1300.0 / 8  # 64-bit DRAM read, low end
CONSTANTS_SOURCE = ("Horowitz, ISSCC 2014, 45 nm: 0.23 pJ/int8 MAC, 0.1 pJ/int32 add per output, 12.5 pJ/B "
                    "SRAM (1 MB), 162.5 pJ/B DRAM")


@dataclass(frozen=True)
class ProxyCost:
    """The operation-proxy energy of one stage (or model) for one inference, in picojoules, by part."""

    mac_pj: float
    add_pj: float
    activation_pj: float
    weight_sram_pj: float
    weight_dram_pj: float

    @property
    def total_mj(self) -> float:
        return (self.mac_pj + self.add_pj + self.activation_pj + self.weight_sram_pj + self.weight_dram_pj) * 1e-9


def _elements(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _bytes(t: TensorSpec) -> int:
    return _elements(t.shape) * (2 if t.dtype == "int16" else 1)   # int16-activation bundles: 2 bytes a value


def _stage_io(stage: StageSpec) -> tuple[int, int]:
    """Bytes of a stage's input and of its outputs."""
    return _bytes(stage.input), sum(_bytes(t) for t in stage.outputs.values())


def working_set(manifest: Manifest) -> tuple[int, int]:
    """(weight bytes of every stage and head, largest stage-boundary activation bytes) of a bundle."""
    weights = sum(s.costs.segment_param_bytes + s.costs.head_param_bytes for s in manifest.stages)
    return weights, max(sum(_stage_io(s)) for s in manifest.stages)


def sram_weight_fraction(weight_bytes: int, activation_bytes: int, cache_bytes: int | None) -> float:
    """Share of weight reads served from the cache under the cache rule (0 without a known cache)."""
    if cache_bytes is None or weight_bytes <= 0:
        return 0.0 if cache_bytes is None else 1.0
    return max(0.0, min(1.0, (cache_bytes - activation_bytes) / weight_bytes))


def _cost(macs: int, act_in: int, act_out: int, weights: int, sram_fraction: float, act_in_sram: bool) -> ProxyCost:
    act_pj = SRAM_PJ_PER_BYTE if act_in_sram else DRAM_PJ_PER_BYTE
    return ProxyCost(mac_pj=macs * INT8_MAC_PJ, add_pj=act_out * INT32_ADD_PJ,
                     activation_pj=(act_in + act_out) * act_pj,
                     weight_sram_pj=weights * sram_fraction * SRAM_PJ_PER_BYTE,
                     weight_dram_pj=weights * (1.0 - sram_fraction) * DRAM_PJ_PER_BYTE)


def stage_costs(manifest: Manifest, cache_bytes: int | None) -> tuple[ProxyCost, ...]:
    """The proxy cost of every stage for one inference, with the bundle's working set against ``cache_bytes``."""
    weights, acts = working_set(manifest)
    frac = sram_weight_fraction(weights, acts, cache_bytes)
    acts_fit = cache_bytes is None or acts <= cache_bytes
    out = []
    for s in manifest.stages:
        act_in, act_out = _stage_io(s)
        c = s.costs
        out.append(_cost(c.segment_macs + c.head_macs, act_in, act_out, c.segment_param_bytes + c.head_param_bytes,
                         frac, acts_fit))
    return tuple(out)


def stages_proxy_mj(manifest: Manifest, board: Board) -> tuple[float, ...]:
    """Operation-proxy energy of every stage (mJ) on ``board`` (its cache size decides SRAM or DRAM)."""
    return tuple(c.total_mj for c in stage_costs(manifest, board.cache_bytes))


def monolithic_cost(manifest: Manifest, cache_bytes: int | None) -> ProxyCost | None:
    """The proxy cost of the bundle's monolithic model (its own working set), or None without one."""
    mono = manifest.monolithic
    if mono is None:
        return None
    act_in, act_out = _bytes(mono.input), _bytes(mono.output)
    frac = sram_weight_fraction(mono.param_bytes, act_in + act_out, cache_bytes)
    return _cost(mono.macs, act_in, act_out, mono.param_bytes, frac,
                 cache_bytes is None or act_in + act_out <= cache_bytes)


def monolithic_proxy_mj(manifest: Manifest, board: Board) -> float | None:
    """Operation-proxy energy (mJ) of the monolithic model on ``board``; None when the bundle has none."""
    cost = monolithic_cost(manifest, board.cache_bytes)
    return None if cost is None else cost.total_mj


def proxy_source(manifest: Manifest, board: Board) -> str:
    """One line: the constants, the cache rule's outcome for this bundle on this board."""
    weights, acts = working_set(manifest)
    frac = sram_weight_fraction(weights, acts, board.cache_bytes)
    cache = "no known cache" if board.cache_bytes is None else f"{board.cache_bytes // 1024} KiB cache"
    mixed = [u for u, e in ((getattr(manifest, "precision", None) or {}).get("units") or {}).items()
             if isinstance(e, dict) and e.get("kind") != "int8"]
    note = (f"; {', '.join(mixed)} compute partly in float32, counted at int8 MAC energy (an underestimate)"
            if mixed else "")
    return (f"operation proxy ({CONSTANTS_SOURCE}); working set {weights / 1024:.0f} KiB weights + "
            f"{acts / 1024:.1f} KiB activations vs {board.name} {cache}: {100 * frac:.0f}% of weight reads from SRAM"
            f"{note}")
