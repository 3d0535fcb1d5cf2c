"""``convert()``: any supported label export -> ``out/annotations.json`` + ``out/images/``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .automl import read_automl
from .build import ConversionReport, build_coco, check_output, write_output
from .coco import read_coco
from .common import ConversionError, ReadContext, ReadResult
from .createml import read_createml
from .cvat import read_cvat
from .detect import detect
from .labelme import read_labelme, read_labelme3
from .labelstudio import read_labelstudio
from .via import read_via
from .voc import read_voc
from .yolo import read_yolo

# --from name -> reader. Plain dict: add a format by adding a reader function here.
FORMATS: dict[str, Callable[[ReadContext], ReadResult]] = {
    "cvat": read_cvat,
    "coco": read_coco,
    "voc": read_voc,
    "yolo": read_yolo,
    "labelstudio": read_labelstudio,
    "labelme": read_labelme,
    "labelme3": read_labelme3,
    "via": read_via,
    "createml": read_createml,
    "automl": read_automl,
}


def read(
    src: str | os.PathLike,
    fmt: str | None = None,
    images: str | os.PathLike | None = None,
    names: list[str] | None = None,
    *,
    include_predictions: bool = False,
) -> tuple[ReadResult, ReadContext, str, bool]:
    """Parse an export without writing anything: (result, context, format, auto-detected)."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    detected = fmt is None
    if fmt is None:
        fmt = detect(src).format
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if images is not None and not Path(images).is_dir():
        raise ConversionError(f"{images}: image folder not found")
    ctx = ReadContext(
        src=src,
        images=Path(images) if images is not None else None,
        names=list(names) if names else None,
        include_predictions=include_predictions,
    )
    return FORMATS[fmt](ctx), ctx, fmt, detected


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike | None,
    fmt: str | None = None,
    images: str | os.PathLike | None = None,
    names: list[str] | None = None,
    link: bool = False,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    strict: bool = False,
    merge_case: bool = False,
    include_predictions: bool = False,
) -> ConversionReport:
    """Convert the label export at ``src`` to COCO in ``out``.

    Args:
        src: the export: a folder, or one annotation file (XML/JSON/CSV/data.yaml/obj.data).
        out: output folder; receives ``annotations.json`` and ``images/``. May be None with
            ``dry_run``.
        fmt: a key of ``FORMATS``; None to auto-detect (FormatDetectionError when unknown or
            ambiguous, listing the candidates).
        images: the image folder when it is not where the export keeps it.
        names: class names: the class-id order for YOLO; for other formats the category list
            and order (labels not in it are skipped as unknown).
        link: symlink the images instead of copying them.
        overwrite: replace an earlier conversion in ``out``.
        dry_run: read, check and report, write nothing.
        progress: tqdm progress bars on stderr for big sets.
        strict: refuse the export for one unreadable or truncated image (default: skip the
            image and list it in the report).
        merge_case: merge class names that differ only in case into the first spelling
            (default: refuse them).
        include_predictions: Label Studio: a task with only predictions takes them as labels.

    Raises ConversionError (the message names the file, the record and the fix) for malformed
    input, escaping image paths, a layout problem (pixels in a normalised format, sizes that
    are not the files', xyxy boxes in COCO's xywh field, 0-based category ids, empty or
    case-duplicate class names), and with ``strict`` an unusable image; nothing is written then.
    """
    result, ctx, fmt, detected = read(
        src, fmt, images, names, include_predictions=include_predictions
    )
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_output(out_path, ctx, result, overwrite or dry_run)
    elif not dry_run:
        raise ConversionError("no output folder given")
    coco, entries, report = build_coco(
        result, ctx, fmt, names, progress=progress, strict=strict, merge_case=merge_case
    )
    report.detected = detected
    report.out = out_path
    if not dry_run and out_path is not None:
        if not report.images:
            skipped = report.skipped_images + report.skipped
            shown = "; ".join(str(s) for s in skipped[:3])
            raise ConversionError(
                f"{src}: no image could be converted, nothing written"
                + (f" ({len(skipped)} records skipped: {shown} ...)" if skipped else "")
            )
        if not report.categories:
            raise ConversionError(f"{src}: no categories found; nothing written")
        write_output(out_path, coco, entries, link, progress=progress)
        report.written = True
    return report
