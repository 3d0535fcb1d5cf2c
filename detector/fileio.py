"""File helpers shared by every stage: atomic writes, safe dataset paths, image reading.

Nothing here imports torch, so the deploy runtime and the label tools can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# EXIF orientations 5-8 rotate by 90/270 degrees: the displayed image is transposed.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

# Refuse absurd images before decoding them (a 20000x20000 RGB frame is 1.2 GB).
MAX_IMAGE_PIXELS = 16_000 * 16_000


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class ImageReadError(ValueError):
    """An image file is missing, unreadable or too large; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image over the pixel limit, refused from its header before any pixel is decoded."""


class UnsafePathError(ImageReadError):
    """A path from a label file escapes the dataset folder (the image is refused, not read)."""


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash or a full disk leaves the previous file intact and no half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual mode
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file, then rename it to ``path``."""
    with atomic_open(path, "wb") as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def refuse_overwrite(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Raise if ``output`` is one of the user's input files: tools never overwrite their input."""
    out = Path(output).resolve()
    for src in inputs:
        if Path(src).resolve() == out:
            raise ValueError(
                f"{output}: refusing to overwrite the input file; choose another output path"
            )


def resolve_inside(root: str | os.PathLike, relative: str, what: str = "file_name") -> Path:
    """Join ``root`` and a path taken from a label file, refusing absolute or escaping paths."""
    if not relative or relative.strip() == "":
        raise UnsafePathError(f"empty {what}")
    rel = relative.replace("\\", "/")
    if os.path.isabs(rel) or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(
            f"{what} {relative!r} is an absolute path; label files must name images relative "
            f"to the image folder {root}"
        )
    # Lexical check: a label file must not climb out with "..", but symlinks the user placed
    # inside the image folder (tools/convert.py --link) are theirs to follow.
    root_abs = Path(os.path.abspath(root))
    full = Path(os.path.normpath(root_abs / rel))
    if full != root_abs and root_abs not in full.parents:
        raise UnsafePathError(f"{what} {relative!r} escapes the image folder {root}; refused")
    return full


def exif_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed, i.e. after its EXIF rotation, read from the header."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:  # not an OSError: it would escape as a traceback
        raise ImageTooLargeError(
            f"{path}: image too large to decode safely ({e}); downscale it (and its boxes) "
            "before training"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode any image to an HxWx3 uint8 RGB array, EXIF orientation applied.

    Grayscale, RGBA, CMYK, palette and 16-bit files all come out as 8-bit RGB. The file type is
    taken from its content, so a PNG named ``.jpg`` reads fine.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: image file not found")
    try:
        width, height = exif_image_size(path)
    except ImageTooLargeError:
        raise  # never hand a decompression bomb to OpenCV
    except ImageReadError:
        width = height = 0  # let OpenCV have a go; it reads a few formats Pillow does not
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(
            f"{path}: image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel limit; "
            "downscale it (and its boxes) before training"
        )
    # IMREAD_COLOR applies EXIF orientation and converts gray/alpha/16-bit/CMYK to 8-bit BGR.
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        # Decoders differ: fall back to Pillow before giving up (e.g. some palette/CMYK files).
        try:
            with Image.open(path) as im:
                from PIL import ImageOps

                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float32)
                    arr = np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
                    return np.ascontiguousarray(np.stack([arr] * 3, axis=-1))
                return np.ascontiguousarray(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageReadError(
                f"{path}: cannot decode image (corrupt or truncated?): {e}"
            ) from None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
