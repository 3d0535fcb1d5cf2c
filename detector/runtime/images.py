"""Read image files safely for the runtime: size from the header first, truncation refused.

OpenCV decodes whatever it is given: a 380 KB PNG that declares 30000 x 30000 pixels is decoded
at 2.5 GB before anything can refuse it, and a JPEG cut short is decoded with its missing rows
filled gray and only a libjpeg warning on stderr. So the width and height are read from the
file's header (JPEG, PNG, BMP, WebP, TIFF; a few stdlib lines each) and refused above a pixel
limit before decoding, and a JPEG without its end marker (EOI) or a PNG without its IEND chunk
is refused by name. numpy, OpenCV and the standard library only (the vehicle has no Pillow).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from ..coco_rules import image_truncation  # the one truncation rule (stdlib only)
from .errors import ImageError

# The same bound as pre-flight's (detector.fileio.MAX_IMAGE_PIXELS, which needs Pillow).
MAX_PIXELS = 16_000 * 16_000


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) hold the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(head):
                return None
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _tiff_size(head: bytes) -> tuple[int, int] | None:
    order = "<" if head[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", head[4:8])
    if offset + 2 > len(head):
        return None
    (count,) = struct.unpack(order + "H", head[offset : offset + 2])
    found: dict[int, int] = {}
    for i in range(count):
        entry = head[offset + 2 + 12 * i : offset + 14 + 12 * i]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = order + ("H" if kind == 3 else "I")
            found[tag] = struct.unpack(fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def header_size(path: str | os.PathLike, head: bytes | None = None) -> tuple[int, int] | None:
    """(width, height) from the file header, or None for a format or layout not parsed here."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(256 * 1024)  # JPEG's size may follow a large EXIF block
    try:
        if head[:3] == b"\xff\xd8\xff":
            return _jpeg_size(head)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:2] == b"BM" and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            return abs(width), abs(height)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp_size(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(head)
    except struct.error:
        return None
    return None


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as HxWx3 uint8 BGR (EXIF orientation applied), or ImageError saying why."""
    path = Path(path)
    try:
        size = header_size(path)
        cut = image_truncation(path)
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(
            f"{path}: {size[0]}x{size[1]} pixels (from its header) is over the limit of "
            f"{max_pixels} pixels; not decoded (an image bomb or a wrong file?)"
        )
    if cut:
        raise ImageError(f"{path}: {cut}; copy the file again or drop it")
    # IMREAD_COLOR applies the EXIF orientation and gives 8-bit BGR for gray/alpha/16-bit files.
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise ImageError(f"{path}: OpenCV cannot decode it (not an image, or a corrupt file)")
    if size is None and frame.shape[0] * frame.shape[1] > max_pixels:
        raise ImageError(f"{path}: {frame.shape[1]}x{frame.shape[0]} pixels is over the limit")
    return frame
