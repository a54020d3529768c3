"""Image files as the RGB a user sees: every common PIL mode converted the same way for training and inference.

Rules: alpha is dropped (as PIL's ``convert("RGB")`` and the official code do; the stored colours under transparent
pixels are kept); 16-bit grayscale (``I;16*``, and ``I``, which PIL uses for 16-bit PGM/PNG/TIFF) is scaled by its
bit depth (v / 257, rounded; ``I`` values outside 0..65535 are clipped); float ``F`` images are read as 0..1 when
their maximum is at most 1, else as 0..255 (clipped, NaN as 0); CMYK, YCbCr, LAB, HSV, 1-bit and palette images use
PIL's conversion. EXIF orientation is NOT applied: COCO boxes are in stored-pixel coordinates, as in the official code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")
SUPPORTED_MODES = frozenset(PIL_MODES + SIXTEEN_BIT_MODES + ("F",))
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for a bad file


class ImageError(ValueError):
    """An image file that cannot be opened, decoded or converted; the one-line message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture of a PIL image of any supported mode (see the module rules)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _gray((values * 255 + 32767) // 65535)  # round(v / 257) in exact integer arithmetic
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return _gray(np.rint(np.clip(values * scale, 0, 255)))
    if mode in ("P", "PA"):  # through RGBA: PIL warns about byte transparency when going to RGB directly
        return image.convert("RGBA").convert("RGB")
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {mode!r}")
    return image.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    """RGB image with three equal channels from 0..255 gray values."""
    gray = values.astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully and convert it to RGB; any failure is an `ImageError` naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except READ_ERRORS as e:
        raise ImageError(f"{path}: cannot decode image: {_reason(e)}") from None


def read_header(path: str | Path) -> tuple[int, int, str]:
    """(width, height, mode) from the file header without decoding the pixels; `ImageError` if it is unusable."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height, mode = im.width, im.height, im.mode
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except READ_ERRORS as e:
        raise ImageError(f"{path}: cannot read image: {_reason(e)}") from None
    if mode not in SUPPORTED_MODES:
        raise ImageError(f"{path}: unsupported image mode {mode!r}")
    return width, height, mode


def _reason(error: BaseException) -> str:
    """One-line text of a PIL exception (without the path PIL puts into its 'cannot identify' message)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file or an unknown format"
    return " ".join(str(error).split()) or type(error).__name__


def _header_or_error(path: Path) -> tuple[int, int, str] | ImageError:
    try:
        return read_header(path)
    except ImageError as e:
        return e


def read_headers(paths: Sequence[Path], desc: str = "checking images") -> Iterator[tuple[int, int, str] | ImageError]:
    """Headers of many files, read by a thread pool (I/O bound), yielded in order with a progress bar on a TTY.

    Errors are yielded, not raised, so the caller decides; leaving the loop early cancels the remaining reads.
    """
    pool = ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1)))
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=None, leave=False) as bar:
            for result in pool.map(_header_or_error, paths):
                bar.update()
                yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
