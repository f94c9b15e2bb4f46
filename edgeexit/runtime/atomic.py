"""Atomic writes of files and whole directories: write aside, fsync, rename.

A reader (or a power cut) sees the old version or the new one, never a mix, a half-written file or a missing
destination:

* :func:`write_file_atomic` writes a uniquely named temporary file beside the target, fsyncs it, renames it
  over the target and fsyncs the directory. A writer killed before the rename leaves its temporary file:
  writers that hold :func:`locked_directory` (the bundle's manifest and signature writers) let the next
  load or write remove such files whatever their age; elsewhere the next write removes them after
  :data:`STALE_TEMP_S`.
* :func:`staging_dir` + :func:`publish_dir` build a directory beside the target and swap it in. Replacing an
  existing directory uses Linux ``renameat2(RENAME_EXCHANGE)``, so the old directory stays whole at the
  destination until the instant of the swap; where the kernel, libc or file system lacks it, the old
  directory is renamed aside first (a moment without a directory at the destination) and put back if the
  second rename fails.

File modes are those of any other tool: a new file gets ``0666`` and a new directory ``0777``, less the process's
umask (the temporary files' private ``0600`` / ``0700`` from :mod:`tempfile` are widened to that before the
rename); a file that replaces an existing one keeps the existing file's mode. A bundle meant for the owner alone
is the owner's choice (``umask 077``, or ``chmod``), as with ``cp`` or ``tar``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import stat
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


def current_umask() -> int:
    """The process's umask (read from /proc/self/status; where that has no "Umask:" line, set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a file written at ``path`` gets: the replaced file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def write_file_atomic(path: str | os.PathLike[str], content: Content, *,
                      stale_after_s: float | None = STALE_TEMP_S) -> Path:
    """Replace ``path`` with ``content`` atomically.

    Args:
        path: the file to write; its directory must exist.
        content: bytes, text (written as UTF-8), or a function that writes into a binary file object
            (e.g. ``lambda f: torch.save(obj, f)``).
        stale_after_s: first remove temporary files of earlier writes to ``path`` untouched for this long
            (killed writers); None = leave them (the caller holds :func:`locked_directory` and removed them).

    Returns:
        ``path``.

    Raises:
        OSError: the directory cannot be written (the target is untouched and no temporary file is left).
    """
    path = Path(path)
    if stale_after_s is not None:
        remove_temps(path, older_than_s=stale_after_s)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp's 0600 -> what a plain open() would give (or the replaced file's mode)
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


def temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files :func:`write_file_atomic` writes beside ``path`` (``.NAME.*.tmp``) that exist now."""
    path = Path(path)
    return [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file() and not p.is_symlink()]


def remove_temps(path: str | os.PathLike[str], older_than_s: float = 0.0) -> int:
    """Remove the temporary files of writes to ``path`` untouched for ``older_than_s`` seconds (0: all of them;
    call it so only while holding :func:`locked_directory`, which every writer holds). Returns how many."""
    now, removed = time.time(), 0
    for tmp in temp_files(path):
        try:
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed += 1
                log.info("removed %s, left by an interrupted write", tmp)
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike[str], *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the directory itself (no lock file is created) while the block runs.

    Writers of files in a directory hold it (``blocking=True`` waits for another writer); a reader that wants to
    tidy up passes ``blocking=False`` and is told whether it got the lock. The kernel releases the lock when its
    holder dies, so temporary files found while holding it belong to no live writer.

    Yields:
        True when the lock is held; False when another process holds it (``blocking=False``), or where the
        platform or file system has no ``flock``.

    Raises:
        OSError: the directory cannot be opened.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the age rule of write_file_atomic applies)
        yield False
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, uniquely named directory beside ``target``, removed on exit unless :func:`publish_dir` moved it."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 -> what os.mkdir would have given
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
