"""Read an ONNX file's metadata without onnxruntime or the onnx package (stdlib only).

An ONNX file is a protobuf ``ModelProto``; its top-level fields are walked here (the graph is
skipped by its length, not parsed), so the metadata can be read before a session exists (the
TensorRT profile comes from it) and a 0-byte, truncated or non-ONNX file is refused by name
before onnxruntime gives its own less helpful message.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from .errors import ModelError

GRAPH_FIELD = 7  # ModelProto.graph
METADATA_FIELD = 14  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}


def _varint(data: bytes | mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes | mmap.mmap, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of each field in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            yield number, wire, None
        elif wire == 2:
            length, pos = _varint(data, pos)
            yield number, wire, (pos, length)
            pos += length
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of the file (truncated)")


def _entry(data: bytes | mmap.mmap, offset: int, length: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, span in _fields(data, offset, offset + length):
        if wire == 2 and number in (1, 2):
            text = bytes(data[span[0] : span[0] + span[1]]).decode("utf-8")
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict; ModelError naming the file if it is no ONNX."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: empty file (0 bytes), not an ONNX model; export it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        metadata: dict[str, str] = {}
        has_graph = False
        try:
            for number, wire, span in _fields(data, 0, size):
                if number == GRAPH_FIELD and wire == 2:
                    has_graph = True
                elif number == METADATA_FIELD and wire == 2:
                    key, value = _entry(data, *span)
                    metadata[key] = value
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(
                f"{path}: not a readable ONNX model ({e}; {size} bytes): a corrupt or "
                "truncated copy? copy or export it again"
            ) from None
    if not has_graph:
        raise ModelError(f"{path}: not an ONNX model (no graph in its {size} bytes)")
    return metadata
