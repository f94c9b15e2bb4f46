"""The real ``edgeexit`` command line, started by ``torch.distributed.run`` in tests/test_distributed.py.

Two hooks, set by environment variables, observe or break a run from outside without changing it:

``EDGEEXIT_TEST_WRITES=FILE``   after every checkpoint write, append ``rank R PATH`` to FILE (the real writer runs);
``EDGEEXIT_TEST_FAIL_RANK=R``   rank R raises in its third training step, as a crashing process would;
``EDGEEXIT_TEST_FLOAT64=1``     build models and inputs in float64, so that float rounding (which training
                                amplifies) does not blur a comparison of two runs.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def _recording(save: Callable[..., Any], log: str, rank: str) -> Callable[..., Any]:
    def recorded(model: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        out = save(model, path, *args, **kwargs)
        with open(log, "a") as fh:
            fh.write(f"rank {rank} {path}\n")
        return out
    return recorded


def main() -> None:
    from edgeexit.cli.main import entry_point
    from edgeexit.workstation.cli import posttrain as posttrain_cli
    from edgeexit.workstation.cli import train as train_cli
    from edgeexit.workstation.training import train as loop

    rank = os.environ.get("RANK", "0")
    log = os.environ.get("EDGEEXIT_TEST_WRITES")
    if log:
        train_cli.save_checkpoint = _recording(train_cli.save_checkpoint, log, rank)
        posttrain_cli.save_checkpoint = _recording(posttrain_cli.save_checkpoint, log, rank)
    if os.environ.get("EDGEEXIT_TEST_FAIL_RANK") == rank:
        real_loss, calls = loop._loss, [0]

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError(f"injected failure in rank {rank}")
            return real_loss(*args, **kwargs)
        loop._loss = failing
    if os.environ.get("EDGEEXIT_TEST_FLOAT64"):
        import torch

        torch.set_default_dtype(torch.float64)
        real_to_tensors = loop.to_tensors

        def to_tensors(*args: Any, **kwargs: Any) -> Any:
            x, y = real_to_tensors(*args, **kwargs)
            return x.double(), y
        loop.to_tensors = to_tensors
    entry_point()


if __name__ == "__main__":
    main()
