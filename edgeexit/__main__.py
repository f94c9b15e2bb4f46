"""``python -m edgeexit``: the ``edgeexit`` command line."""

from .cli.main import entry_point

entry_point()
