"""Atomic writes (edgeexit.runtime.atomic): readers see the old version or the new one, never a gap or half a file."""

from __future__ import annotations

import threading

import pytest

from edgeexit.runtime.atomic import publish_dir, staging_dir, write_file_atomic

pytestmark = pytest.mark.runtime  # numpy, Pillow, click and a TFLite interpreter only (device/legacy runs)


def test_write_file_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    (tmp_path / ".result.json.tmp").write_text("someone else's")  # a fixed temp name must not be reused
    write_file_atomic(target, "new")
    write_file_atomic(tmp_path / "blob.bin", b"\x00\x01")
    write_file_atomic(tmp_path / "written.bin", lambda f: f.write(b"by a writer"))
    assert target.read_text() == "new"
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "written.bin").read_bytes() == b"by a writer"
    assert (tmp_path / ".result.json.tmp").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.json.tmp", "blob.bin", "result.json", "written.bin"]


def test_write_file_atomic_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old weights")

    def half_written(f):
        f.write(b"new wei")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomic(target, half_written)
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_staging_dir_is_removed_when_not_published(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "bundle") as staged:
            (staged / "stage_0.tflite").write_bytes(b"partial")
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_publish_dir_never_leaves_the_destination_missing(tmp_path):
    out = tmp_path / "bundle"
    with staging_dir(out) as staged:
        for name in ("manifest.json", "stage_0.tflite"):
            (staged / name).write_text("0")
        publish_dir(staged, out)
    seen, problems, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            for name in ("manifest.json", "stage_0.tflite"):
                try:
                    text = (out / name).read_text()
                except FileNotFoundError:
                    problems.append(f"{name} missing")
                    continue
                if not text.isdigit():
                    problems.append(f"{name} half-written: {text!r}")
                seen.add(text)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 201):
            with staging_dir(out) as staged:
                for name in ("manifest.json", "stage_0.tflite"):
                    (staged / name).write_text(str(version))
                publish_dir(staged, out)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert (out / "manifest.json").read_text() == "200"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or old directories left
    assert len(seen) > 1  # the reader really ran during the swaps


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A process killed between writing its temporary file and the rename (e.g. `tune` killed) leaves
    `.manifest.json.XXXX.tmp`; the next write of that file removes it once it is stale, never a fresh one."""
    import os
    import time

    from edgeexit.runtime.atomic import STALE_TEMP_S

    target = tmp_path / "manifest.json"
    stale = tmp_path / ".manifest.json.k1ll3d.tmp"
    fresh = tmp_path / ".manifest.json.inflight.tmp"   # another writer, still working
    other = tmp_path / ".other.json.k1ll3d.tmp"        # not this file's
    for p in (stale, fresh, other):
        p.write_text("{half")
    old = time.time() - STALE_TEMP_S - 5
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_file_atomic(target, "{}")
    assert target.read_text() == "{}"
    assert not stale.exists() and fresh.exists() and other.exists()
