"""A generated corpus of hostile bundles and inputs, and a runner that tries each on the CLI in its own process.

Generation (:func:`build`) copies a clean bundle and mutates it: bytes of the stage / monolithic files (with the
manifest's sha256 and size updated, as an attacker or a broken copy tool would), targeted edits of the files'
flatbuffer fields (buffer, tensor and op-code indices, dimensions, scales, options), the manifest's fields
(wrong types, out-of-range and non-finite values, inconsistent costs / quantization / preprocessing / scores,
deep nesting, huge sizes, control characters), the file system (symlink loops, directories, FIFOs, missing or
unreadable files, odd names) and image files (decompression bombs, truncated, not images, FIFOs, 16-bit PNGs);
and data sets given to ``tune`` (pickles that would run code, lying .npy / IDX headers, truncated archives,
huge images), options a rule ignores and an empty trusted-key variable, each refused with its exit code.

Running (``python hostile_corpus.py CASES.json RESULTS.json``) forks one child per command, with stdout and
stderr in files and a timeout, so a segfault or a hang is recorded, never fatal to the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

TIMEOUT_S = 20.0


# ---- file helpers -------------------------------------------------------------------------------------------
def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, m: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(m, indent=1))


def _rehash(bundle: Path) -> None:
    """Update every file's size and sha256 in the manifest (what an attacker does after editing a file)."""
    m = _manifest(bundle)
    for entry in m["stages"] + ([m["monolithic"]] if m.get("monolithic") else []):
        data = (bundle / entry["file"]).read_bytes()
        entry["sha256"], entry["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    _write_manifest(bundle, m)


def _png(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` grey pixels (the pixel data may be absent)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def write_clean_images(folder: Path, n: int = 6, seed: int = 3) -> list[str]:
    """``n`` seeded 28x28 grey PNG files (written without Pillow)."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        rows = b"".join(b"\x00" + bytes(rng.randrange(256) if (x // 4 + y // 4 + i) % 3 else 0 for x in range(28))
                        for y in range(28))
        p = folder / f"img{i}.png"
        p.write_bytes(_png(28, 28, rows))
        paths.append(str(p))
    return paths


# ---- flatbuffer field locations (found with the runtime's own bounds-checked reader) ------------------------
def _fields(data: bytes) -> dict[str, list[int]]:
    """Byte positions of interesting scalar fields of a .tflite file, by kind."""
    from edgeexit.runtime import tflite as T

    r = T._Reader(data, "x")
    model = r.table(int(r.get("<I", 0)))
    sg = r.tables(model, 2)[0]
    out: dict[str, list[int]] = {k: [] for k in ("buffer", "dim", "scale", "zero_point", "op_input", "op_output",
                                                 "opcode_index", "builtin_code", "type", "option", "subgraph_io")}
    for t in r.tables(sg, 0):
        for kind, i, size in (("buffer", 2, 4), ("type", 1, 1)):
            p = r.field(t, i, size)
            if p is not None:
                out[kind].append(p)
        v = r.ref(t, 0)
        if v is not None:
            out["dim"].extend(v + 4 + 4 * k for k in range(int(r.get("<I", v))))
        q = r.ref(t, 4)
        if q is not None:
            qt = r.table(q)
            for kind, i, size in (("scale", 2, 4), ("zero_point", 3, 8)):
                v = r.ref(qt, i)
                if v is not None:
                    out[kind].extend(v + 4 + size * k for k in range(int(r.get("<I", v))))
    for i in (1, 2):
        v = r.ref(sg, i)
        if v is not None:
            out["subgraph_io"].extend(v + 4 + 4 * k for k in range(int(r.get("<I", v))))
    for op in r.tables(sg, 3):
        p = r.field(op, 0, 4)
        if p is not None:
            out["opcode_index"].append(p)
        for kind, i in (("op_input", 1), ("op_output", 2)):
            v = r.ref(op, i)
            if v is not None:
                out[kind].extend(v + 4 + 4 * k for k in range(int(r.get("<I", v))))
        o = r.ref(op, 4)
        if o is not None:
            ot = r.table(o)
            out["option"].extend(p for p in (r.field(ot, i, 1) for i in range(7)) if p is not None)
    for code in r.tables(model, 1):
        for i in (0, 3):
            p = r.field(code, i, 1)
            if p is not None:
                out["builtin_code"].append(p)
    return out


def payload_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges whose change alters numbers, not structure: constant data, and the scales / zero points of
    tensors that are not graph inputs or outputs (a bundle's manifest records only those)."""
    from edgeexit.runtime import tflite as T

    r = T._Reader(data, "x")
    model = r.table(int(r.get("<I", 0)))
    ranges = []
    for b in r.tables(model, 4):
        v = r.ref(b, 0)
        if v is not None:
            ranges.append((v + 4, v + 4 + int(r.get("<I", v))))
    sg = r.tables(model, 2)[0]
    io = set(r.vector(sg, 1, "i")) | set(r.vector(sg, 2, "i"))
    for k, t in enumerate(r.tables(sg, 0)):
        q = r.ref(t, 4)
        if q is None or k in io:
            continue
        qt = r.table(q)
        for i, size in ((0, 4), (1, 4), (2, 4), (3, 8)):
            v = r.ref(qt, i)
            if v is not None:
                ranges.append((v + 4, v + 4 + size * int(r.get("<I", v))))
    return ranges


# ---- the corpus ---------------------------------------------------------------------------------------------
class Corpus:
    """Cases: each a bundle directory (or the clean one) and what to run on it."""

    def __init__(self, clean: Path, work: Path, images: list[str]):
        self.clean, self.work, self.images = clean, work, images
        self.cases: list[dict[str, Any]] = []

    def bundle(self, case_id: str, edit: Callable[[Path], Any], expect: str, kind: str) -> None:
        """A mutated copy of the bundle; ``expect`` = "strict" (refused or identical) or "payload" (may differ
        without a signature: a change of numbers the structure cannot tell from the producer's)."""
        d = self.work / f"b{len(self.cases):04d}"
        shutil.copytree(self.clean, d, symlinks=True)
        edit(d)
        self.cases.append({"id": case_id, "kind": kind, "expect": expect, "bundle": str(d), "images": self.images})

    def images_case(self, case_id: str, paths: list[str]) -> None:
        self.cases.append({"id": case_id, "kind": "image", "expect": "strict", "bundle": str(self.clean),
                           "images": paths})

    def command_case(self, case_id: str, kind: str, argv: list[str], code: int, marker: Path | None = None,
                     env: dict[str, str] | None = None) -> None:
        """A whole command (``edgeexit ARGV``) that must be refused with exit code ``code``; ``marker``: a path
        that exists afterwards only if the input ran code of its own."""
        self.cases.append({"id": case_id, "kind": kind, "expect": "refused", "argv": argv, "code": code,
                           "marker": str(marker) if marker else None, "env": env or {}})


def _file_edit(name: str, change: Callable[[bytearray], Any], rehash: bool = True) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        change(data)
        (d / name).write_bytes(bytes(data))
        if rehash:
            _rehash(d)
    return edit


def _manifest_edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        m = _manifest(d)
        change(m)
        _write_manifest(d, m)
    return edit


def _raw_manifest(text_change: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        p = d / "manifest.json"
        p.write_text(text_change(p.read_text()))
    return edit


def _leaves(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, path + (k,))] or [path]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, path + (i,))] or [path]
    return [path]


def _set(obj: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


HOSTILE_VALUES = [None, -1, 0, 2 ** 62, 10 ** 30, 1e308, -1e-300, "x", "", [], {}, True, [[[]]],
                  "a\nerror: forged", "\ud800", "\x00", "9" * 5000]


def build(clean: Path, work: Path, seed: int = 0, bit_flips: int = 40, field_cases: int = 80) -> Corpus:
    """Generate the corpus under ``work`` (clean bundle copied, never modified)."""
    rng = random.Random(seed)
    imgs = work / "images"
    imgs.mkdir(parents=True)
    c = Corpus(clean, work, write_clean_images(imgs))
    m0 = _manifest(clean)
    files = [s["file"] for s in m0["stages"]] + ([m0["monolithic"]["file"]] if m0.get("monolithic") else [])

    # 1. random byte changes in the files, sha256 updated: strict where they hit structure
    for i in range(bit_flips):
        name = rng.choice(files)
        data = (clean / name).read_bytes()
        pos = rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        payload = any(a <= pos < b for a, b in payload_ranges(data))
        c.bundle(f"flip {name}@{pos}^{bit}", _file_edit(name, lambda d, p=pos, b=bit: d.__setitem__(p, d[p] ^ b)),
                 "payload" if payload else "strict", "file-bytes")
    # 2. targeted field edits in the files, sha256 updated: always strict
    values = {"buffer": [0, 1, 0x7FFFFFFF, 0xFFFFFFFF], "dim": [0, -1, 2, 0x7FFFFFFF], "scale": [0.0, -1.0,
              float("nan"), float("inf"), 1e-45], "zero_point": [-1000, 2 ** 40], "op_input": [-1, -2, 0x7FFFFFFF, 0],
              "op_output": [-1, 0, 0x7FFFFFFF], "opcode_index": [0x7FFFFFFF, 99], "builtin_code": [0x7F, 32, 0],
              "type": [5, 13, 99], "option": [0, 0x7F, 0xFF], "subgraph_io": [-1, 0x7FFFFFFF, 0]}
    formats = {"scale": "<f", "zero_point": "<q", "builtin_code": "<b", "type": "<b", "option": "<B"}
    for name in files:
        data = (clean / name).read_bytes()
        for kind, positions in _fields(data).items():
            for pos in rng.sample(positions, min(2, len(positions))):
                value = rng.choice(values[kind])
                fmt = formats.get(kind, "<i" if isinstance(value, int) and value < 0 else "<I")
                if kind == "builtin_code" or kind == "type":
                    value = max(-128, min(127, value))
                payload = any(a <= pos < b for a, b in payload_ranges(data))
                c.bundle(f"field {name} {kind}@{pos}={value}",
                         _file_edit(name, lambda d, p=pos, f=fmt, v=value: struct.pack_into(f, d, p, v)),
                         "payload" if payload else "strict", "file-field")
    for name in files[:2]:
        c.bundle(f"truncate {name}", _file_edit(name, lambda d: d.__delitem__(slice(len(d) // 2, None))), "strict",
                 "file-bytes")
        c.bundle(f"empty {name}", _file_edit(name, lambda d: d.clear()), "strict", "file-bytes")
        c.bundle(f"garbage {name}", _file_edit(name, lambda d: d.__setitem__(slice(0, None), os.urandom(len(d)))),
                 "strict", "file-bytes")
        c.bundle(f"root offset {name}", _file_edit(name, lambda d: struct.pack_into("<I", d, 0, len(d) - 2)),
                 "strict", "file-bytes")

    # 3. manifest fields: random hostile values anywhere (the exit rule and stored points excepted: valid
    #    thresholds legitimately change exits), then targeted inconsistencies
    leaves = [p for p in _leaves(m0) if p and p[0] not in ("exit_rule", "operating_points")]
    for _ in range(field_cases):
        path, value = rng.choice(leaves), rng.choice(HOSTILE_VALUES)
        c.bundle(f"manifest {'.'.join(map(str, path))}={value!r:.30}",
                 _manifest_edit(lambda m, p=path, v=value: _set(m, p, copy.deepcopy(v))), "strict", "manifest")
    s0 = m0["stages"][0]
    targeted: list[tuple[str, Callable[[dict], Any]]] = [
        ("pixel_scale 0", lambda m: m["input"]["preprocessing"].update(pixel_scale=0)),
        ("pixel_scale -1/255", lambda m: m["input"]["preprocessing"].update(pixel_scale=-1 / 255)),
        ("pixel_scale 1e-30", lambda m: m["input"]["preprocessing"].update(pixel_scale=1e-30)),
        ("mean 1e6", lambda m: m["input"]["preprocessing"].update(mean=[1e6] * len(m["input"]["preprocessing"]["mean"]))),
        ("std 1e-300", lambda m: m["input"]["preprocessing"].update(std=[1e-300] * len(m["input"]["preprocessing"]["std"]))),
        ("std 1e300", lambda m: m["input"]["preprocessing"].update(std=[1e300] * len(m["input"]["preprocessing"]["std"]))),
        ("size off by one", lambda m: m["input"]["preprocessing"]["size"].__setitem__(1, m["input"]["preprocessing"]["size"][1] + 1)),
        ("size 100000", lambda m: m["input"]["preprocessing"].update(size=[100000, 100000])),
        ("color_mode flipped", lambda m: m["input"]["preprocessing"].update(
            color_mode="RGB" if m["input"]["preprocessing"]["color_mode"] == "L" else "L", mean=[0.5] * 3, std=[0.5] * 3)),
        ("scores flipped", lambda m: [s.update(scores="sigmoid" if s["scores"] == "softmax" else "softmax")
                                      for s in m["stages"]]),
        ("full_macs -1", lambda m: m.update(full_macs=-1)),
        ("full_macs +1", lambda m: m.update(full_macs=m["full_macs"] + 1)),
        ("segment_macs +1", lambda m: m["stages"][0]["costs"].update(segment_macs=s0["costs"]["segment_macs"] + 1)),
        ("head_param_bytes 0", lambda m: m["stages"][0]["costs"].update(head_param_bytes=0)),
        ("monolithic macs 1", lambda m: m.get("monolithic") and m["monolithic"].update(macs=1)),
        ("logits scale rounded", lambda m: [s["outputs"]["logits"]["quantization"].update(
            scale=float(f"{s['outputs']['logits']['quantization']['scale']:.6g}")) for s in m["stages"]]),
        ("logits scale doubled", lambda m: m["stages"][-1]["outputs"]["logits"]["quantization"].update(
            scale=2 * m["stages"][-1]["outputs"]["logits"]["quantization"]["scale"])),
        ("input scale nudged", lambda m: [t["quantization"].update(scale=t["quantization"]["scale"] * (1 + 1e-7))
                                          for t in (m["input"]["tensor"], m["stages"][0]["input"])]),
        ("feature shape", lambda m: m["stages"][0]["outputs"]["features"].update(shape=[1, 1, 1, 1])),
        ("label newline", lambda m: m["labels"].__setitem__(0, "zero\nerror: forged line")),
        ("label surrogate", lambda m: m["labels"].__setitem__(0, "\ud800")),
        ("label escape", lambda m: m["labels"].__setitem__(0, "\x1b[2J")),
        ("label long", lambda m: m["labels"].__setitem__(0, "L" * 100000)),
        ("labels extra", lambda m: m["labels"].append("extra")),
        ("labels 10^6", lambda m: m.update(labels=[str(i) for i in range(10 ** 6)])),
        ("file NUL", lambda m: m["stages"][0].update(file="stage\u0000.tflite")),
        ("file 5000 chars", lambda m: m["stages"][0].update(file="s" * 5000 + ".tflite")),
        ("file newline", lambda m: m["stages"][0].update(file="stage\n0.tflite")),
        ("file twice", lambda m: m["stages"][1].update({k: m["stages"][0][k] for k in ("file", "sha256", "size_bytes")})),
        ("file is manifest", lambda m: m["stages"][0].update(file="manifest.json")),
        ("stage index", lambda m: m["stages"][0].update(index=5)),
        ("format_version 0", lambda m: m.update(format_version=0)),
        ("stages empty", lambda m: m.update(stages=[])),
        ("stages 1000", lambda m: m.update(stages=m["stages"] * 400)),
        ("fixed exit 99", lambda m: m.update(exit_rule={"kind": "fixed", "thresholds": [], "exit": 99})),
        ("thresholds NaN-like", lambda m: m["exit_rule"].update(thresholds=[1e308] * len(m["exit_rule"]["thresholds"]))),
        ("thresholds count", lambda m: m["exit_rule"].update(thresholds=[0.5] * 7)),
        ("rule unknown", lambda m: m["exit_rule"].update(kind="magic")),
        ("point malformed", lambda m: m.update(operating_points={"p": {"exit_rule": {"kind": 5}}})),
        ("root is a list", lambda m: m.clear() or m.update(format=["edgeexit-bundle"])),
    ]
    for case_id, change in targeted:
        c.bundle(f"manifest {case_id}", _manifest_edit(change), "strict", "manifest")
    raw = [("NaN pixel_scale", lambda t: t.replace('"pixel_scale": ', '"pixel_scale": NaN, "x": ', 1)),
           ("1e400 pixel_scale", lambda t: t.replace('"pixel_scale": ', '"pixel_scale": 1e400, "x": ', 1)),
           ("Infinity scale", lambda t: t.replace('"scale": ', '"scale": Infinity, "x": ', 1)),
           ("huge int", lambda t: t.replace('"full_macs": ', '"full_macs": ' + "9" * 5000 + ', "x": ', 1)),
           ("deep nesting", lambda t: t.replace('{', '{"deep": ' + "[" * 200000 + "]" * 200000 + ",", 1)),
           ("moderate nesting", lambda t: t.replace('{', '{"deep": ' + "[" * 40 + "]" * 40 + ",", 1)),
           ("not JSON", lambda t: t[: len(t) // 2]),
           ("BOM", lambda t: "\ufeff" + t),
           ("huge", lambda t: t.replace('{', '{"pad": "' + "x" * (17 << 20) + '",', 1))]
    for case_id, change in raw:
        c.bundle(f"manifest {case_id}", _raw_manifest(change), "strict", "manifest")
    c.bundle("manifest not UTF-8", lambda d: (d / "manifest.json").write_bytes(
        (d / "manifest.json").read_bytes().replace(b'"name"', b'"n\xffame"', 1)), "strict", "manifest")

    # 4. the file system
    stage0 = m0["stages"][0]["file"]

    def replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
        def edit(d: Path) -> None:
            (d / name).unlink()
            make(d / name)
        return edit

    fs = [("symlink loop", lambda p: os.symlink(p.name, p)),
          ("symlink pair loop", lambda p: (os.symlink(p.name + ".b", p), os.symlink(p.name, str(p) + ".b"))),
          ("symlink outside", lambda p: os.symlink("/etc/hostname", p)),
          ("symlink /dev/zero", lambda p: os.symlink("/dev/zero", p)),
          ("directory", lambda p: p.mkdir()),
          ("fifo", lambda p: os.mkfifo(p)),
          ("dangling symlink", lambda p: os.symlink("nowhere.tflite", p))]
    for what, make in fs:
        c.bundle(f"stage file {what}", replace(stage0, make), "strict", "filesystem")
        c.bundle(f"manifest {what}", replace("manifest.json", make), "strict", "filesystem")
    c.bundle("stage file unreadable", lambda d: os.chmod(d / stage0, 0), "strict", "filesystem")
    c.bundle("manifest unreadable", lambda d: os.chmod(d / "manifest.json", 0), "strict", "filesystem")
    c.bundle("manifest missing", lambda d: (d / "manifest.json").unlink(), "strict", "filesystem")
    c.bundle("bundle is a file", lambda d: (shutil.rmtree(d), d.write_text("x")), "strict", "filesystem")

    # 5. images given to `run`
    bad = work / "bad-images"
    bad.mkdir()
    (bad / "bomb.png").write_bytes(_png(20000, 20000))
    (bad / "big.png").write_bytes(_png(9000, 9000))
    (bad / "wide.png").write_bytes(_png(2 ** 31 - 1, 1))
    (bad / "truncated.png").write_bytes(Path(c.images[0]).read_bytes()[:60])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    os.mkfifo(bad / "fifo.png")
    (bad / "dir.png").mkdir()
    forged = bad / "a\nerror: forged.png"
    forged.write_bytes(Path(c.images[0]).read_bytes())
    for p in sorted(bad.iterdir()):
        c.images_case(f"image {p.name!r}", [c.images[0], str(p)])
    c.images_case("image path NUL", [c.images[0] + "\x00x"])
    c.images_case("image path 5000 chars", ["i" * 5000 + ".png"])
    sixteen = work / "sixteen"
    sixteen.mkdir()
    for i, path in enumerate(c.images[:2]):  # the same pixels as 16-bit PNGs (v * 257, as tools widen 8-bit)
        (sixteen / f"img{i}-16bit.png").write_bytes(png16(Path(path).read_bytes()))
    c.images_case("image 16-bit grey PNG", [c.images[0], str(sixteen / "img0-16bit.png")])

    # 6. data sets given to `tune` (dry run: the clean bundle is never written), and options
    data = work / "data"
    data.mkdir()
    tune = ["tune", str(clean), "--dry-run", "--cost-images", "0", "--data"]
    for case_id, spec, marker in hostile_data(data):
        c.command_case(f"data {case_id}", "data", [*tune, spec], 5, marker)
    img = c.images[0]
    for case_id, argv in (("--rule final --thresholds", ["--rule", "final", "--thresholds", "0.5,0.5"]),
                          ("--rule fixed --thresholds", ["--rule", "fixed", "--exit", "1", "--thresholds", "0.5"]),
                          ("--rule original --exit", ["--rule", "original", "--exit", "1"])):
        c.command_case(f"option {case_id}", "option", ["run", str(clean), img, *argv], 2)
    c.command_case("option EDGEEXIT_TRUSTED_KEY=''", "option", ["run", str(clean), img], 2,
                   env={"EDGEEXIT_TRUSTED_KEY": ""})
    return c


# ---- hostile data files -------------------------------------------------------------------------------------
def png16(png8: bytes) -> bytes:
    """A grey 8-bit PNG as a 16-bit PNG of the same image (each value v stored as v * 257)."""
    from PIL import Image
    import io

    import numpy as np

    with Image.open(io.BytesIO(png8)) as im:
        a = np.asarray(im.convert("L"), dtype=np.uint16) * 257
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")  # mode I;16
    return out.getvalue()


class _Payload:
    """Pickles to a call of ``func(*args)``: what a malicious data file holds."""

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def malicious_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles whose loading would create ``marker`` (a file or directory), in several disguises."""
    import builtins
    import pickle

    import numpy as np

    touch = _Payload(os.system, f"touch {marker}")
    return {
        "os.system": pickle.dumps(touch, protocol=2),
        "open() in the batch dict": pickle.dumps({"data": _Payload(builtins.open, str(marker), "w"),
                                                  "labels": [0]}, protocol=4),
        "os.mkdir under numpy data": pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                                                   "filenames": [_Payload(os.mkdir, str(marker))]}, protocol=2),
        "eval": pickle.dumps(_Payload(builtins.eval, f"open({str(marker)!r}, 'w')"), protocol=0),
    }


def _npz_with(path: Path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(shape_text: str, body: bytes, descr: str = "|u1") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def hostile_data(folder: Path) -> list[tuple[str, str, Path | None]]:
    """(case id, --data spec, marker) for data sets every loader must refuse with one line and exit code 5."""
    import gzip
    import io
    import pickle

    import numpy as np

    out: list[tuple[str, str, Path | None]] = []
    ok_images, ok_labels = _npy("(2, 28, 28)", bytes(2 * 28 * 28)), _npy("(2,)", bytes(16), "<i8")
    for i, name in enumerate(malicious_pickles(folder)):
        d, marker = folder / f"cifar-{i}", folder / f"marker-cifar-{i}"
        d.mkdir()
        (d / "test_batch").write_bytes(malicious_pickles(marker)[name])
        out.append((f"cifar10 pickle {name}", f"cifar10:{d}", marker))
    marker = folder / "marker-npz"
    obj = io.BytesIO()
    np.save(obj, np.array([_Payload(os.mkdir, str(marker))], dtype=object), allow_pickle=True)
    _npz_with(folder / "object.npz", {"images.npy": obj.getvalue(), "labels.npy": ok_labels})
    out.append(("npz object array (pickle)", str(folder / "object.npz"), marker))
    _npz_with(folder / "not-npy.npz", {"images": b"not an array", "labels.npy": ok_labels})
    out.append(("npz member not .npy", str(folder / "not-npy.npz"), None))
    _npz_with(folder / "zero-d-classes.npz", {"images.npy": ok_images, "labels.npy": ok_labels,
                                               "classes.npy": _npy("()", b"a" * 4, "<U1")})
    out.append(("npz 0-d classes", str(folder / "zero-d-classes.npz"), None))
    _npz_with(folder / "huge.npz", {"images.npy": _npy(f"({1 << 40},)", bytes(64)), "labels.npy": ok_labels})
    out.append(("npz .npy header 2^40 elements", str(folder / "huge.npz"), None))
    _npz_with(folder / "short.npz", {"images.npy": _npy("(2, 28, 28)", bytes(100)), "labels.npy": ok_labels})
    out.append(("npz .npy body short", str(folder / "short.npz"), None))
    (folder / "cut.npz").write_bytes((folder / "zero-d-classes.npz").read_bytes()[:300])
    out.append(("npz cut short", str(folder / "cut.npz"), None))
    idx = struct.pack(">BBBB3I", 0, 0, 8, 3, 2, 28, 28) + bytes(2 * 28 * 28)
    labels = struct.pack(">BBBBI", 0, 0, 8, 1, 2) + bytes(2)
    for case_id, images in (("IDX header cut short", idx[:6]), ("IDX 0 dimensions", struct.pack(">BBBB", 0, 0, 8, 0)),
                            ("IDX 2^32 x 2^32 declared", struct.pack(">BBBB2I", 0, 0, 8, 2, 2**32 - 1, 2**32 - 1)),
                            ("IDX body short", idx[:-10])):
        d = folder / f"idx-{len(out)}"
        d.mkdir()
        (d / "t10k-images-idx3-ubyte").write_bytes(images)
        (d / "t10k-labels-idx1-ubyte").write_bytes(labels)
        out.append((case_id, f"fashion-mnist:{d}", None))
    d = folder / "idx-gz"
    d.mkdir()
    noisy = idx[:16] + np.random.default_rng(0).integers(0, 256, 2 * 28 * 28, dtype=np.uint8).tobytes()
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(noisy)[:-200])
    (d / "t10k-labels-idx1-ubyte").write_bytes(labels)
    out.append(("IDX truncated .gz", f"fashion-mnist:{d}", None))
    d = folder / "cifar-bin"
    d.mkdir()
    (d / "test_batch.bin").write_bytes(bytes(3073 + 100))
    out.append(("cifar10 binary batch cut", f"cifar10:{d}", None))
    d = folder / "bomb-folder"
    (d / "0").mkdir(parents=True)
    (d / "0" / "bomb.png").write_bytes(_png(20000, 20000))
    out.append(("image folder 20000x20000 PNG", str(d), None))
    d = folder / "big-folder"
    (d / "0").mkdir(parents=True)
    (d / "0" / "big.png").write_bytes(_png(9000, 9000))
    out.append(("image folder 9000x9000 PNG", str(d), None))
    d = folder / "float-folder"
    (d / "0").mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.full((28, 28), 0.5, np.float32), "F").save(d / "0" / "f.tif")
    out.append(("image folder 32-bit float TIFF", str(d), None))
    return out


# ---- running ------------------------------------------------------------------------------------------------
def _run_cli(argv: list[str], out_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``edgeexit ARGV`` in a forked child; rc, signal, timeout, stdout and stderr."""
    out, err = out_dir / "stdout", out_dir / "stderr"
    pid = os.fork()
    if pid == 0:  # child
        try:
            fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.update(env or {})
            from edgeexit.cli.main import entry_point
            try:
                entry_point(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            code = 99
        os._exit(code)
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"rc": None, "signal": None, "timeout": True, "stdout": "", "stderr": ""}
        time.sleep(0.002)
    read = lambda p: p.read_bytes().decode("utf-8", "replace") if p.exists() else ""
    return {"rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, "timeout": False,
            "stdout": read(out), "stderr": read(err)}


def answers(result: dict[str, Any]) -> list[tuple]:
    """(label, exit, score) per input from `run --json` output."""
    rows = [json.loads(line) for line in result["stdout"].splitlines() if line.strip()]
    return [(r["label"], r["exit_index"], round(r["score"], 6)) for r in rows]


def run_cases(cases: list[dict[str, Any]], clean: str, out_dir: Path) -> list[dict[str, Any]]:
    # import the device stack once, before forking, so each child starts warm
    import numpy  # noqa: F401
    from edgeexit.cli import device, main  # noqa: F401
    from edgeexit.runtime import runner  # noqa: F401

    ref = _run_cli(["run", clean, "--json", *cases[0]["images"]], out_dir)
    results = [{"id": "clean", "ref": ref}]
    for case in cases:
        if "argv" in case:
            r = {"id": case["id"], "kind": case["kind"], "expect": case["expect"], "code": case["code"],
                 "run": _run_cli(case["argv"], out_dir, case["env"])}
            r["executed"] = bool(case["marker"]) and os.path.lexists(case["marker"])
            results.append(r)
            continue
        r = {"id": case["id"], "kind": case["kind"], "expect": case["expect"],
             "run": _run_cli(["run", case["bundle"], "--json", *case["images"]], out_dir)}
        if case["kind"] != "image":
            r["info"] = _run_cli(["info", case["bundle"]], out_dir)
        results.append(r)
    return results


if __name__ == "__main__":
    cases_file, clean_bundle, results_file = sys.argv[1:4]
    work = Path(results_file).parent / "cli-out"
    work.mkdir(exist_ok=True)
    res = run_cases(json.loads(Path(cases_file).read_text()), clean_bundle, work)
    Path(results_file).write_text(json.dumps(res))
