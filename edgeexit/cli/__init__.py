"""The ``edgeexit`` command line (:mod:`edgeexit.cli.main`) and its device commands."""

# console scripts installed before the move call edgeexit.cli:entry_point
from .main import entry_point  # noqa: F401
