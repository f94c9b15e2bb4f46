"""One exception hierarchy for everything edgeexit raises on purpose.

Every message is one line that says what was received, what was expected and how to fix it.
The CLI prints ``error: <message>`` and exits with the class's ``exit_code``; it never shows a traceback
for an :class:`EdgeExitError`.
"""

from __future__ import annotations


class EdgeExitError(Exception):
    """Base class of every error edgeexit raises on purpose."""

    exit_code = 1


class UsageError(EdgeExitError, ValueError):
    """A bad option, argument or parameter value (CLI exit code 2)."""

    exit_code = 2


class BundleError(EdgeExitError):
    """A bundle that is missing, corrupt, tampered with or of an unsupported format version."""

    exit_code = 3


class InputError(EdgeExitError, ValueError):
    """An input the Runner cannot take: wrong shape, dtype, channels, NaN/Inf, not an image."""

    exit_code = 4


class DatasetError(EdgeExitError):
    """A dataset that cannot be read or does not fit the model or bundle."""

    exit_code = 5


class InterpreterError(EdgeExitError):
    """No usable TFLite interpreter (or Edge TPU delegate) could be loaded."""

    exit_code = 6


class ConversionError(EdgeExitError):
    """A network that cannot be converted (unsupported layer, failed tolerance with --strict, ...)."""

    exit_code = 7


class CheckpointError(EdgeExitError):
    """A checkpoint that is not one, is corrupt, or does not fit the architecture."""

    exit_code = 8


class TuningError(EdgeExitError):
    """A tuning target no operating point can meet, or tuning data that does not fit the bundle."""

    exit_code = 9


class EnergyError(EdgeExitError):
    """A power measurement that could not finish (the sensor went away); the partial result is still kept."""

    exit_code = 10


def printable(text: object, limit: int = 300) -> str:
    """``text`` safe to print on one terminal line: every non-printable character (newline, tab, control and
    format characters, lone surrogates) escaped as ``\\xNN`` / ``\\uNNNN``, cut to ``limit`` characters."""
    s = str(text)
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s[:limit])
    return out + ("..." if len(s) > limit else "")


def clip(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most about ``limit`` characters: cut at a word boundary and marked with "..."
    (a message is never cut inside a word, a number or a quoted name)."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit)
    return (line[:cut] if cut > limit // 2 else line[:limit]).rstrip(" ,;:([{") + " ..."
