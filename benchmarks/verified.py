"""Only verified bundles are quoted: the benchmark scripts' check of a bundle's int8 verification.

A bundle's manifest records whether its int8 files passed the conversion's check against the float network
(:meth:`edgeexit.runtime.manifest.Manifest.verification_verdict`, the same verdict ``edgeexit bench`` records
and warns about). Every script that measures a bundle calls :func:`require_verified` before it quotes
anything: a bundle whose verification failed or was skipped is refused unless ``--allow-unverified`` is given,
and the returned record goes into the result file either way. Needs only the device side (no torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgeexit.errors import printable  # noqa: E402
from edgeexit.runtime.bundle import read_manifest  # noqa: E402


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-unverified``: measure a bundle whose int8 verification failed or was skipped."""
    parser.add_argument("--allow-unverified", action="store_true",
                        help="measure a bundle whose int8 verification failed or was skipped (the result file "
                             "records its verdict)")


def require_verified(bundle: str | os.PathLike[str], allow_unverified: bool) -> dict[str, Any]:
    """The verdict record of ``bundle`` for a result file; SystemExit (one line) if it is not verified and
    ``allow_unverified`` is False, a warning on stderr if it is allowed."""
    _, manifest = read_manifest(bundle)
    reason = manifest.unverified_reason()
    if reason is not None:
        reason = printable(reason, 500)  # tolerance names and failures come from the manifest
        if not allow_unverified:
            raise SystemExit(f"error: bundle {bundle}: {reason}; benchmark figures are quoted only for verified "
                             "bundles: re-convert it with verification images, or pass --allow-unverified (the result "
                             "file records the verdict)")
        print(f"warning: bundle {bundle}: {reason}; measured anyway (--allow-unverified)", file=sys.stderr)
    return {"bundle": manifest.name, "path": str(Path(bundle).resolve()), **manifest.verification_verdict(),
            "allowed_unverified": reason is not None}
