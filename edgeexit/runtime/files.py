"""Reading a bundle's files without trusting the file system: one function, one-line errors.

:func:`read_regular` opens without following the caller into a hang (``O_NONBLOCK``: a FIFO or a device
never blocks the open), checks the opened descriptor is a regular file no larger than a limit, and turns
every operating-system failure (permission, symlink loop, directory, NUL byte or over-long name, ...) into
a one-line :class:`~edgeexit.errors.BundleError` (or, for other files read the same way, such as a data set's,
the caller's error class and fix).
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Iterator

from ..errors import BundleError, EdgeExitError

BUNDLE_FIX = "re-copy the bundle"

#: Longest file name (bytes of one path component) and path accepted; the usual Linux limits.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def describe_os_error(exc: BaseException) -> str:
    """A short reason for an OSError / ValueError from the file system (never a multi-line text)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())[:80] or type(exc).__name__


def read_regular(path: str | os.PathLike[str], max_bytes: int, what: str, *,
                 error: type[EdgeExitError] = BundleError, fix: str = BUNDLE_FIX) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``).

    Args:
        path: the file.
        max_bytes: refuse larger files.
        what: how the file is named in messages (e.g. ``'stage_0.tflite'``).
        error, fix: the error raised and the fix its message ends with (default: a bundle file's).

    Raises:
        BundleError (``error``): the file cannot be opened or read, is not a regular file, or is too large.
    """
    with open_regular(path, max_bytes, what, error=error, fix=fix) as (_, data):
        return data


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], max_bytes: int, what: str, *, error: type[EdgeExitError] = BundleError,
                 fix: str = BUNDLE_FIX) -> Iterator[tuple[int, bytes]]:
    """Open the regular file ``path``: yields (its open descriptor, its bytes); the descriptor is closed after.

    ``/proc/self/fd/<descriptor>`` then names the very file that was read, even if the path is replaced.

    Raises:
        BundleError: as :func:`read_regular`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as exc:
        raise error(f"{what}: cannot open it ({describe_os_error(exc)}); {fix} and check its permissions") from None
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{what}: is not a regular file (a directory, FIFO or device); {fix}")
            if st.st_size > max_bytes:
                raise error(f"{what}: {st.st_size} bytes, more than the {max_bytes} accepted; {fix}")
            chunks, left = [], max_bytes + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as exc:
            raise error(f"{what}: cannot read it ({describe_os_error(exc)}); {fix}") from None
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise error(f"{what}: grew past {max_bytes} bytes while being read; {fix}")
        yield fd, data
    finally:
        os.close(fd)


__all__ = ["read_regular", "open_regular", "describe_os_error", "MAX_NAME_BYTES", "MAX_PATH_BYTES"]
