"""Atomic writes of files and whole directories: write aside, fsync, rename.

A reader (or a power cut) sees the old version or the new one, never a mix, a half-written file or a missing
destination:

* :func:`write_file_atomic` writes a uniquely named temporary file beside the target, fsyncs it, renames it
  over the target and fsyncs the directory.
* :func:`staging_dir` + :func:`publish_dir` build a directory beside the target and swap it in. Replacing an
  existing directory uses Linux ``renameat2(RENAME_EXCHANGE)``, so the old directory stays whole at the
  destination until the instant of the swap; where the kernel, libc or file system lacks it, the old
  directory is renamed aside first (a moment without a directory at the destination) and put back if the
  second rename fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

log = logging.getLogger(__name__)

Content = Union[bytes, str, Callable[[BinaryIO], object]]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: A temporary file of an earlier write to the same target, untouched for this long, was left by a process that
#: was killed mid-write (an exception removes its own); the next write removes it.
STALE_TEMP_S = 600.0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike[str], content: Content) -> Path:
    """Replace ``path`` with ``content`` atomically.

    Args:
        path: the file to write; its directory must exist.
        content: bytes, text (written as UTF-8), or a function that writes into a binary file object
            (e.g. ``lambda f: torch.save(obj, f)``).

    Returns:
        ``path``.

    Raises:
        OSError: the directory cannot be written (the target is untouched and no temporary file is left).
    """
    path = Path(path)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files that killed writers of ``path`` left (older than :data:`STALE_TEMP_S`)."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                log.info("removed %s, left by an interrupted write", tmp)
        except OSError:
            pass


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, uniquely named directory beside ``target``, removed on exit unless :func:`publish_dir` moved it."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the complete directory ``staged`` to ``target``, replacing what is there.

    Every file and directory in ``staged`` is fsynced first, then the two are swapped atomically (see the
    module docstring) and the old directory is deleted.

    Returns:
        ``target``.

    Raises:
        OSError: a rename failed; ``target`` still holds the old directory.
    """
    staged, target = Path(staged), Path(target)
    for root, _dirs, files in os.walk(staged):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))
    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # now the old directory
    else:
        log.debug("renameat2(RENAME_EXCHANGE) unavailable; replacing %s with two renames", target)
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(old, target)  # put the previous directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(target.parent)
    return target
