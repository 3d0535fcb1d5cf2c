"""Draw the boxes and class names of a few images to PNG files, to eyeball a conversion.

Images are read like the trainer reads them (``read_image_rgb``: EXIF rotation applied), so a box
that looks wrong here is wrong in training too. Crowd boxes are drawn thin with "(crowd)".
"""

from __future__ import annotations

import colorsys
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..coco_rules import usable_xywh
from ..fileio import ImageReadError, UnsafePathError, atomic_write_with, read_image_rgb
from .common import CocoError, check_output, image_dir_for, load_coco_json, safe_image_path


@dataclass
class ShowResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "image id N (name): why"


def class_color(category_id: Any) -> tuple[int, int, int]:
    """A stable, saturated BGR colour per category id (golden-ratio hue steps)."""
    try:
        k = int(category_id)
    except (TypeError, ValueError):
        k = sum(map(ord, str(category_id)))
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_boxes(
    image_rgb: np.ndarray,
    annotations: Sequence[dict[str, Any]],
    names: dict[Any, str],
    max_size: int = 1280,
    caption: str = "",
) -> np.ndarray:
    """A BGR copy of the image (downscaled to ``max_size``) with boxes and labels, and the
    caption on a strip above it."""
    height, width = image_rgb.shape[:2]
    scale = min(1.0, max_size / max(height, width)) if max_size > 0 else 1.0
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if scale < 1.0:
        canvas = cv2.resize(
            canvas, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA
        )
    canvas = np.ascontiguousarray(canvas)
    ch, cw = canvas.shape[:2]
    thick = max(1, round(max(ch, cw) / 400))
    font_scale = max(0.4, max(ch, cw) / 1400)
    skipped = 0
    for ann in annotations:
        box = usable_xywh(ann.get("bbox"))
        if box is None:
            skipped += 1
            continue
        x, y, w, h = (v * scale for v in box)
        p1, p2 = (round(x), round(y)), (round(x + w), round(y + h))
        cid = ann.get("category_id")
        color = class_color(cid)
        crowd = bool(ann.get("iscrowd"))
        cv2.rectangle(canvas, p1, p2, color, 1 if crowd else thick, cv2.LINE_8)
        text = str(names.get(cid, f"?{cid}")) + (" (crowd)" if crowd else "")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        tx = min(max(p1[0], 0), max(cw - tw - 2, 0))
        ty = p1[1] - 2 if p1[1] - th - base - 2 >= 0 else min(p1[1] + th + 2, ch - base)
        cv2.rectangle(canvas, (tx, ty - th - 2), (tx + tw + 2, ty + base), color, cv2.FILLED)
        cv2.putText(
            canvas,
            text,
            (tx + 1, ty),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    if skipped:
        caption = f"{caption}  [{skipped} invalid boxes not drawn]"
    if caption:  # on a black strip above the image, so it hides no label
        (_, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        strip = np.zeros((th + base + 6, cw, 3), dtype=np.uint8)
        cv2.putText(
            strip,
            caption,
            (3, th + 3),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        canvas = np.vstack([strip, canvas])
    return canvas


def _out_name(image_id: Any, file_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(file_name)).stem)[:80]
    return f"{image_id}_{stem}.png"


def show_coco(
    annotations: str | Path,
    out_dir: str | Path,
    n: int = 16,
    ids: Sequence[Any] | None = None,
    seed: int = 0,
    images_dir: str | Path | None = None,
    max_size: int = 1280,
    progress: bool = True,
    overwrite: bool = False,
) -> ShowResult:
    """Draw ``n`` random images (or the given ``ids``) to ``out_dir/<id>_<name>.png``.

    Listed images that are missing or unreadable are skipped (and reported) and the next random
    one is taken. Refuses to write into the image folder, and over an existing PNG unless
    ``overwrite``.
    """
    annotations = Path(annotations)
    data = load_coco_json(annotations)
    image_dir = image_dir_for(annotations, images_dir)
    out = Path(out_dir)
    if out.resolve() == image_dir or image_dir in out.resolve().parents:
        raise CocoError(
            f"{out}: inside the image folder {image_dir}; the PNGs would read as "
            "unlisted images there: choose another --out"
        )
    names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
    records = {r["id"]: r for r in data["images"] if isinstance(r, dict) and "id" in r}
    boxes: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            boxes[ann.get("image_id")].append(ann)
    if ids:
        by_text = {str(k): k for k in records}
        unknown = [i for i in ids if str(i) not in by_text]
        if unknown:
            raise CocoError(f"{annotations}: no image with id {', '.join(map(str, unknown))}")
        order = [by_text[str(i)] for i in ids]
        want = len(order)
    else:
        order = sorted(records, key=str)
        random.Random(seed).shuffle(order)
        want = min(n, len(order))
    result = ShowResult()
    bar = tqdm(total=want, desc="draw", unit="img", disable=not progress, leave=False)
    for image_id in order:
        if len(result.written) >= want:
            break
        rec = records[image_id]
        label = f"image id {image_id} ({rec.get('file_name')})"
        target = out / _out_name(image_id, str(rec.get("file_name")))
        check_output(target, annotations, overwrite=overwrite)
        try:
            path = safe_image_path(image_dir, rec.get("file_name"), image_id)
            rgb = read_image_rgb(path)
        except (UnsafePathError, ImageReadError) as e:
            result.skipped.append(f"{label}: {e}")
            continue
        anns = boxes.get(image_id, [])
        caption = f"id {image_id} {rec.get('file_name')}: {len(anns)} boxes"
        stored = (rec.get("width"), rec.get("height"))
        if stored != (rgb.shape[1], rgb.shape[0]):
            caption += f" [JSON size {stored[0]}x{stored[1]}, file {rgb.shape[1]}x{rgb.shape[0]}]"
        canvas = draw_boxes(rgb, anns, names, max_size, caption)
        ok, png = cv2.imencode(".png", canvas)
        if not ok:
            raise CocoError(f"{label}: OpenCV could not encode the PNG")
        atomic_write_with(target, lambda f, buf=png: f.write(buf.tobytes()))
        result.written.append(target)
        bar.update(1)
    bar.close()
    return result
