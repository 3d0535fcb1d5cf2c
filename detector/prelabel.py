"""Pre-annotations: a model's detections as files a labelling tool imports as pre-labels.

``detector predict MODEL.onnx PHOTOS --format cvat labelstudio coco --out DIR`` writes

* ``DIR/cvat.xml``: CVAT for images 1.1 (upload with "Upload annotations", format "CVAT 1.1");
  every box has ``source="auto"`` and the text attributes ``score`` and ``model``;
* ``DIR/labelstudio.json``: Label Studio tasks whose boxes are ``predictions`` (with
  ``model_version`` and a score per task and per box), not ``annotations``;
* ``DIR/coco.json``: COCO with a ``score`` and ``model`` on every annotation.

So a corrected export can be told from the model's guess: a box a person draws has no score
(CVAT: no ``score`` attribute, source ``manual``; Label Studio: it is in ``annotations``); a
pre-label nobody touched keeps the exact coordinates of ``coco.json``.

Only the standard library is used (no torch, PIL or yaml): this runs where ``predict`` runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMATS = ("cvat", "labelstudio", "coco")
FILE_NAMES = {"cvat": "cvat.xml", "labelstudio": "labelstudio.json", "coco": "coco.json"}
LABEL_STUDIO_URL_PREFIX = "/data/local-files/?d="  # local-files storage; uploads differ


def output_paths(out: Path, formats: list[str]) -> list[Path]:
    return [out / FILE_NAMES[f] for f in formats]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _by_image(results: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: -r["score"]):
        by_image.setdefault(int(r["image_id"]), []).append(r)
    return by_image


def coco_prelabels(
    images: list[dict[str, Any]],
    results: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    model: str,
) -> dict[str, Any]:
    """A COCO file of the detections, each annotation with its ``score`` and ``model``."""
    annotations = []
    for image_id, dets in sorted(_by_image(results).items()):
        for r in dets:
            x, y, w, h = r["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": r["category_id"],
                    "bbox": [x, y, w, h],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                    "score": r["score"],
                    "model": model,
                }
            )
    return {
        "info": {"description": f"pre-annotations predicted by {model}", "model": model},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def cvat_prelabels(
    images: list[dict[str, Any]],
    results: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    model: str,
) -> str:
    """CVAT for images 1.1 XML; boxes with ``source="auto"`` and ``score``/``model`` attributes."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _cvat_meta(root, len(images), categories, model)
    name_of = {c["id"]: str(c["name"]) for c in categories}
    by_image = _by_image(results)
    for index, image in enumerate(images):
        element = ET.SubElement(
            root,
            "image",
            id=str(index),
            name=str(image["file_name"]),
            width=str(image["width"]),
            height=str(image["height"]),
        )
        for r in by_image.get(int(image["id"]), []):
            x, y, w, h = r["bbox"]
            box = ET.SubElement(
                element,
                "box",
                label=name_of[r["category_id"]],
                source="auto",
                occluded="0",
                xtl=f"{x:.2f}",
                ytl=f"{y:.2f}",
                xbr=f"{x + w:.2f}",
                ybr=f"{y + h:.2f}",
                z_order="0",
            )
            ET.SubElement(box, "attribute", name="score").text = f"{r['score']:.4f}"
            ET.SubElement(box, "attribute", name="model").text = model
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _cvat_meta(root: ET.Element, size: int, categories: list[dict[str, Any]], model: str) -> None:
    """The task's <meta>: its labels, each with the text attributes ``score`` and ``model``."""
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    ET.SubElement(task, "name").text = f"pre-annotations by {model}"
    ET.SubElement(task, "size").text = str(size)
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for category in categories:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = str(category["name"])
        ET.SubElement(label, "type").text = "rectangle"
        attributes = ET.SubElement(label, "attributes")
        for name in ("score", "model"):
            attribute = ET.SubElement(attributes, "attribute")
            ET.SubElement(attribute, "name").text = name
            ET.SubElement(attribute, "mutable").text = "False"
            ET.SubElement(attribute, "input_type").text = "text"
            ET.SubElement(attribute, "default_value")
            ET.SubElement(attribute, "values")
    ET.SubElement(meta, "dumped").text = datetime.now(timezone.utc).isoformat()


def labelstudio_prelabels(
    images: list[dict[str, Any]],
    results: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    model: str,
    url_prefix: str = LABEL_STUDIO_URL_PREFIX,
) -> list[dict[str, Any]]:
    """Label Studio tasks with the boxes as ``predictions`` (percent of the image).

    The labelling config needs ``<Image name="image" value="$image"/>`` and
    ``<RectangleLabels name="label" toName="image">`` with the model's class names.
    """
    name_of = {c["id"]: str(c["name"]) for c in categories}
    by_image = _by_image(results)
    tasks = []
    for image in images:
        width, height = float(image["width"]), float(image["height"])
        dets = by_image.get(int(image["id"]), [])
        boxes = []
        for k, r in enumerate(dets):
            x, y, w, h = r["bbox"]
            boxes.append(
                {
                    "id": f"p{image['id']}_{k}",
                    "from_name": "label",
                    "to_name": "image",
                    "type": "rectanglelabels",
                    "original_width": int(width),
                    "original_height": int(height),
                    "image_rotation": 0,
                    "value": {
                        "x": 100 * x / width,
                        "y": 100 * y / height,
                        "width": 100 * w / width,
                        "height": 100 * h / height,
                        "rotation": 0,
                        "rectanglelabels": [name_of[r["category_id"]]],
                    },
                    "score": r["score"],
                }
            )
        prediction = {
            "model_version": model,
            "score": min((b["score"] for b in boxes), default=0.0),
            "result": boxes,
        }
        tasks.append(
            {"data": {"image": f"{url_prefix}{image['file_name']}"}, "predictions": [prediction]}
        )
    return tasks


def write_prelabels(
    out: Path,
    formats: list[str],
    images: list[dict[str, Any]],
    results: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    model: str,
    url_prefix: str = LABEL_STUDIO_URL_PREFIX,
) -> list[Path]:
    """Write each format's file in ``out`` (atomically); the paths written."""
    written = []
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        if fmt == "coco":
            text = json.dumps(coco_prelabels(images, results, categories, model), indent=1)
        elif fmt == "cvat":
            text = cvat_prelabels(images, results, categories, model)
        elif fmt == "labelstudio":
            tasks = labelstudio_prelabels(images, results, categories, model, url_prefix)
            text = json.dumps(tasks, indent=1)
        else:
            raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
        _atomic_write_text(path, text + ("" if text.endswith("\n") else "\n"))
        written.append(path)
    return written
