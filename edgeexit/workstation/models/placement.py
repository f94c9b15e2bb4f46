"""Where early exits go: after the block where the cumulative trunk cost first reaches a target fraction.

Pure functions on lists of numbers (no torch). With exits ``i = 0..N`` (``N`` = the final classifier) and
full trunk cost ``F``, the target of exit ``i`` is, per scheme (EENets' schemes):

* ``pareto``     F * (1 - 0.8 ** (i + 1))
* ``fine``       F * (1 - 0.95 ** (i + 1))       (the EENet authors' default)
* ``linear``     F * (i + 1) / (N + 1)
* ``gold_ratio`` F * phi ** (i - N), phi = 1.618
"""

from __future__ import annotations

from typing import Sequence

from edgeexit.errors import UsageError

SCHEMES = ("pareto", "fine", "linear", "gold_ratio")
PHI = 1.618


def target_fractions(num_exits: int, scheme: str) -> list[float]:
    """Target cost fractions of the early exits (the final exit, fraction 1, is not listed).

    Args:
        num_exits: exits including the final classifier (N + 1), at least 1.
        scheme: one of :data:`SCHEMES`.

    Returns:
        ``num_exits - 1`` increasing fractions in (0, 1).
    """
    if scheme not in SCHEMES:
        raise UsageError(f"unknown placement scheme '{scheme}'; expected one of {', '.join(SCHEMES)}")
    if num_exits < 1:
        raise UsageError(f"num_exits must be at least 1 (the final classifier), got {num_exits}")
    n = num_exits - 1  # index of the final exit
    if scheme == "pareto":
        return [1 - 0.8 ** (i + 1) for i in range(n)]
    if scheme == "fine":
        return [1 - 0.95 ** (i + 1) for i in range(n)]
    if scheme == "linear":
        return [(i + 1) / (n + 1) for i in range(n)]
    return [PHI ** (i - n) for i in range(n)]


def place_exits(block_costs: Sequence[float], num_exits: int, scheme: str) -> list[int]:
    """Choose after which blocks the early exits sit.

    Exit ``i`` goes after the first block whose cumulative cost reaches ``target_i * F``; when two exits
    would share a block, the later one moves to the next block. The final exit always follows the last block.

    Args:
        block_costs: cost of each trunk block in order (MACs), at least ``num_exits`` blocks.
        num_exits: exits including the final classifier.
        scheme: one of :data:`SCHEMES`.

    Returns:
        ``num_exits`` strictly increasing block indices; the last one is ``len(block_costs) - 1``.

    Raises:
        UsageError: unknown scheme, or fewer blocks than exits.
    """
    fractions = target_fractions(num_exits, scheme)
    last = len(block_costs) - 1
    if len(block_costs) < num_exits:
        raise UsageError(f"{num_exits} exits need at least {num_exits} blocks, the backbone has {len(block_costs)}; "
                         "use fewer exits or a deeper backbone")
    total = float(sum(block_costs))
    cumulative, running = [], 0.0
    for c in block_costs:
        running += float(c)
        cumulative.append(running)
    cuts: list[int] = []
    for i, frac in enumerate(fractions):
        idx = next(j for j, cum in enumerate(cumulative) if cum >= frac * total - 1e-9 * total)
        idx = max(idx, cuts[-1] + 1 if cuts else 0)
        # leave room for the exits still to place (each needs its own block before the last one)
        idx = min(idx, last - (len(fractions) - i))
        cuts.append(idx)
    return cuts + [last]


def validate_cuts(cuts: Sequence[int], num_blocks: int) -> list[int]:
    """Check explicit exit positions (block indices) and append the final exit if it is missing.

    Raises:
        UsageError: indices not strictly increasing or outside ``0..num_blocks-1``.
    """
    cuts = [int(c) for c in cuts]
    if cuts and cuts[-1] != num_blocks - 1:
        cuts.append(num_blocks - 1)
    if not cuts or any(b <= a for a, b in zip(cuts, cuts[1:])) or cuts[0] < 0 or cuts[-1] >= num_blocks:
        raise UsageError(f"exit positions {cuts} must be strictly increasing block indices in 0..{num_blocks - 1}")
    return cuts
