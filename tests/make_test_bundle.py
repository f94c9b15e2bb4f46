"""Convert the tests' tiny seeded model into a bundle once, for every test environment to share.

    python tests/make_test_bundle.py OUT_DIR

scripts/test.sh runs it in the workstation environment and points $EDGEEXIT_TEST_BUNDLE at OUT_DIR, so the
device-only, legacy-interpreter and arm64 runs test the runtime against a real conversion without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymodels import convert_tiny  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/make_test_bundle.py OUT_DIR", file=sys.stderr)
        return 2
    report = convert_tiny(Path(argv[0]), force=True)
    print(report.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
