"""Turning an image into the first stage's int8 (or int16) input tensor.

Accepted inputs (:data:`ImageLike`):

* an image file path (``str`` or ``os.PathLike``) -- opened with Pillow, converted to the bundle's colour
  mode ("L" or "RGB") and resized to its (height, width) with bilinear filtering;
* a ``PIL.Image.Image`` -- converted and resized the same way;
* a numpy array of shape ``[H, W, C]`` or ``[1, H, W, C]`` (``[H, W]`` is accepted for "L" bundles), where
  H, W and C must already equal the bundle's size and channels (arrays are never resized; pass a PIL image
  or a file to have them resized), and dtype is either

  - ``uint8``: raw pixels 0..255, or
  - ``float32`` / ``float64``: pixels already multiplied by ``pixel_scale`` (usually 1/255, i.e. in [0, 1]),
    BEFORE mean/std normalisation.

Then ``x = (pixel * pixel_scale - mean) / std`` per channel and ``q = clip(round(x / scale) + zero_point)``
with the input tensor's quantization. For uint8 inputs both steps are one precomputed 256-entry lookup
table per channel, straight to the input tensor's type (int8, uint8, or int16 for int16-activation bundles).

Image files must be regular files of at most :data:`MAX_IMAGE_PIXELS` pixels (64 megapixels: an 8000 x 8000
image, more than any camera a board is used with; below Pillow's own decompression-bomb warning at 89
megapixels). The same limit applies to PIL images passed in. A larger image is refused with an InputError
before it is decoded.

16-bit grey images (PNG / TIFF; Pillow modes ``I;16*``, and ``I``, which is how Pillow opens some of them) are
scaled to 8 bits, ``round(v * 255 / 65535)`` (:func:`to_8bit`), not clipped; 32-bit float images are refused.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Any, Union

import numpy as np

from ..errors import BundleError, InputError, printable
from .manifest import QUANTIZED_DTYPES, Preprocessing, TensorSpec

ImageLike = Union[str, "os.PathLike[str]", np.ndarray, Any]  # Any: PIL.Image.Image (Pillow imported lazily)

#: Float inputs may exceed the nominal pixel range by this much (resampling overshoot) before being refused.
FLOAT_RANGE_TOLERANCE = 1e-3
#: Largest image (width * height) decoded or resized.
MAX_IMAGE_PIXELS = 64_000_000
#: The preprocessing must map pixels 0..255 onto at least this many distinct input levels per channel: fewer
#: means mean / std / pixel_scale do not fit the input tensor's quantization (every image nearly one input).
MIN_INPUT_LEVELS = 32


def check_preprocessing(prep: Preprocessing, tensor: TensorSpec) -> None:
    """The preprocessing fits the bundle's input tensor: its size, its channels, and its quantization.

    Raises:
        BundleError: a size or colour mode that is not the tensor's, or mean / std / pixel_scale that map
            pixels 0..255 onto fewer than :data:`MIN_INPUT_LEVELS` int8 levels (after clipping).
    """
    shape = tensor.shape
    if len(shape) != 4 or shape[0] != 1 or (shape[1], shape[2]) != prep.size or shape[3] != prep.channels:
        raise BundleError(f"manifest: preprocessing {prep.color_mode} {prep.size[0]}x{prep.size[1]} does not fit the "
                          f"input tensor {list(shape)} ([1, height, width, channels]); the manifest was edited: "
                          "re-create the bundle")
    if tensor.dtype not in QUANTIZED_DTYPES or tensor.quantization is None:
        return  # the Preprocessor refuses such a bundle with its own message
    levels = Preprocessor(prep, tensor).lut
    fewest = min(len(np.unique(row)) for row in levels)
    if fewest < MIN_INPUT_LEVELS:
        raise BundleError(f"manifest: preprocessing (pixel_scale {prep.pixel_scale:g}, mean {list(prep.mean)}, std "
                          f"{list(prep.std)}) maps pixels 0..255 onto only {fewest} input levels (at least "
                          f"{MIN_INPUT_LEVELS} expected); it does not fit the input quantization: re-create the bundle")


class Preprocessor:
    """Converts one image to the quantized ``[H, W, C]`` input of a bundle's first stage."""

    def __init__(self, prep: Preprocessing, tensor: TensorSpec):
        self.prep = prep
        self.height, self.width = prep.size
        self.channels = prep.channels
        if tensor.dtype not in QUANTIZED_DTYPES or tensor.quantization is None:
            raise InputError(f"the bundle's input tensor is {tensor.dtype} without int8/int16 quantization; edgeexit "
                             "runs full-integer bundles only: re-create it with `edgeexit convert`")
        self.dtype = np.dtype(tensor.dtype)
        self.scale = float(tensor.quantization.scale)
        self.zero_point = int(tensor.quantization.zero_point)
        self._mean = np.asarray(prep.mean, np.float64)  # [C]
        self._std = np.asarray(prep.std, np.float64)    # [C]
        self._max_float = 255.0 * prep.pixel_scale
        info = np.iinfo(self.dtype)
        self._qmin, self._qmax = info.min, info.max
        pixels = np.arange(256, dtype=np.float64)[None, :]                       # [1, 256]
        with np.errstate(over="ignore", invalid="ignore"):
            real = (pixels * prep.pixel_scale - self._mean[:, None]) / self._std[:, None]  # [C, 256]
            self.lut = self._quantize(np.nan_to_num(real))                       # [C, 256] input dtype
        self._channel = np.arange(self.channels)                                 # [C] for lut[channel, pixel]

    def _quantize(self, real: np.ndarray) -> np.ndarray:
        q = np.rint(real / self.scale) + self.zero_point
        return np.clip(q, self._qmin, self._qmax).astype(self.dtype)

    def __call__(self, image: ImageLike) -> np.ndarray:
        """Return the quantized input, ``[H, W, C]`` of the input tensor's dtype.

        Raises:
            InputError: a missing file, a file that is not an image, or an array of the wrong shape,
                channels or dtype, or with NaN/Inf or out-of-range values.
        """
        if isinstance(image, np.ndarray):
            arr = self._check_array(image)
        elif isinstance(image, (str, os.PathLike)):
            arr = self._load_file(image)
        elif _is_pil_image(image):
            arr = self._from_pil(image)
        else:
            raise InputError(f"cannot classify a {type(image).__name__}; pass an image file path, a PIL image or a "
                             f"numpy array [{self.height}, {self.width}, {self.channels}] (uint8 pixels or float "
                             "pixels in [0, 1])")
        if arr.dtype == np.uint8:
            if self.channels == 1:
                return self.lut[0][arr]                       # [H, W, 1]
            return self.lut[self._channel, arr]               # [H, W, C]
        return self._quantize((arr - self._mean) / self._std)  # float [H, W, C] -> int8

    # ---- input kinds ----------------------------------------------------------------------------------
    def _check_array(self, a: np.ndarray) -> np.ndarray:
        want = f"[{self.height}, {self.width}, {self.channels}] or [1, {self.height}, {self.width}, {self.channels}]"
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise InputError(f"got a batch of {a.shape[0]} images {list(a.shape)}; the Runner takes one image "
                                 f"at a time ({want}): loop over the batch or use runner.trace(images)")
            a = a[0]
        elif a.ndim == 2 and self.channels == 1:
            a = a[:, :, None]
        if a.ndim != 3:
            raise InputError(f"got an array of shape {list(a.shape)}; expected {want}")
        if a.shape[2] != self.channels:
            raise InputError(f"got {a.shape[2]} channels (shape {list(a.shape)}); this bundle takes {self.channels} "
                             f"({self.prep.color_mode}): expected {want}")
        if a.shape[:2] != (self.height, self.width):
            raise InputError(f"got an image of {a.shape[0]}x{a.shape[1]} pixels; this bundle takes "
                             f"{self.height}x{self.width}: resize it, or pass a PIL image or file path "
                             "(resized automatically)")
        if a.dtype == np.uint8:
            return a
        if a.dtype not in (np.float32, np.float64):
            raise InputError(f"got dtype {a.dtype}; expected uint8 pixels (0..255) or float32 pixels scaled to "
                             f"[0, {self._max_float:g}]")
        if not np.isfinite(a).all():
            raise InputError("the input contains NaN or Inf values; expected finite pixels")
        lo, hi = float(a.min()), float(a.max())
        if lo < -FLOAT_RANGE_TOLERANCE or hi > self._max_float + FLOAT_RANGE_TOLERANCE:
            raise InputError(f"float pixels range over [{lo:g}, {hi:g}]; expected [0, {self._max_float:g}] (pixels "
                             "times pixel_scale, before mean/std); for raw 0..255 values pass uint8")
        return a

    def _load_file(self, path: str | os.PathLike[str]) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        name = printable(os.fspath(path))
        try:  # O_NONBLOCK: a FIFO or device path must not hang the open
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            raise InputError(f"{name}: no such file; check the path") from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:80]
            raise InputError(f"{name}: cannot open it ({reason}); check the path and its permissions") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise InputError(f"{name}: is a directory; pass image files" if stat.S_ISDIR(mode) else
                             f"{name}: is not a regular file (a FIFO or device?); pass image files")
        with os.fdopen(fd, "rb") as f:
            try:
                with warnings.catch_warnings():  # Pillow warns (not raises) from 89 to 179 megapixels
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(f) as img:
                        return self._from_pil(img)
            except UnidentifiedImageError:
                raise InputError(f"{name}: not an image Pillow can read (PNG, JPEG, BMP, ...)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise InputError(f"{name}: more than {MAX_IMAGE_PIXELS} pixels; downscale it first") from None
            except InputError:
                raise
            except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt image data
                raise InputError(f"{name}: cannot decode the image ({' '.join(str(exc).split()):.100}); the "
                                 "file is corrupt or truncated") from None

    def _from_pil(self, img: Any) -> np.ndarray:
        from PIL import Image

        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"the image has {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} accepted; "
                             "downscale it first")
        img = to_8bit(img)
        if img.mode != self.prep.color_mode:
            img = img.convert(self.prep.color_mode)
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr  # [H, W, C] uint8


def to_8bit(img: Any) -> Any:
    """A 16-bit grey PIL image as an 8-bit "L" image, ``v8 = round(v16 * 255 / 65535)``; other images unchanged.

    Pillow's own conversion of these modes to "L" clips every value above 255 (a 16-bit image then reads as
    nearly white). The rounding formula is the PNG specification's recommended sample-depth scaling: it maps
    the whole 16-bit range linearly with the least error and inverts exactly the bit replication (``v * 257``)
    that libpng, Pillow and ImageMagick use to widen 8-bit images to 16 bits (where a plain ``v >> 8`` is exact
    too, but truncates every other 16-bit value downwards).

    Raises:
        InputError: a 32-bit integer image with values outside 0..65535, or a floating-point image.
    """
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img)                                              # [H, W] uint16 (I;16*) or int32 (I)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise InputError(f"a 32-bit integer image with values {int(a.min())}..{int(a.max())}; expected 8-bit "
                             "or 16-bit pixels: convert it to an 8-bit image first")
        v8 = (a.astype(np.uint32) * 255 + 32767) // 65535               # round(v * 255 / 65535), exact in integers
        return Image.fromarray(v8.astype(np.uint8), "L")
    if mode == "F":
        raise InputError("a 32-bit floating-point image; its pixel range is not known: convert it to an 8-bit or "
                         "16-bit image first")
    return img


def _is_pil_image(obj: Any) -> bool:
    # Avoid importing Pillow for array inputs: a PIL image's class lives in a PIL module.
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert") and hasattr(obj, "resize")
