"""Small real COCO sets for tests: coco128 images (official JSON), downscaled for CPU speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2

from detector.config import Config, config_from_dict


def write_coco128_subset(
    shared_datasets: Path,
    out: Path,
    image_ids: list[int] | None = None,
    count: int = 4,
    max_side: int = 192,
    keep_negatives: int = 0,
    name: str = "annotations.json",
) -> Path:
    """Copy ``count`` annotated coco128 images (+ negatives) downscaled, with their boxes scaled."""
    src = shared_datasets / "coco128"
    data = json.loads((src / "annotations/instances_train2017.json").read_text())
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    images = sorted(data["images"], key=lambda i: i["id"])
    present = [i for i in images if (src / "images/train2017" / i["file_name"]).is_file()]
    if image_ids is None:
        chosen = [i for i in present if i["id"] in anns_by_image][:count]
        chosen += [i for i in present if i["id"] not in anns_by_image][:keep_negatives]
    else:
        chosen = [i for i in present if i["id"] in set(image_ids)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    out_images, out_anns = [], []
    for info in chosen:
        image = cv2.imread(str(src / "images/train2017" / info["file_name"]))
        scale = max_side / max(image.shape[:2])
        small = cv2.resize(
            image,
            (round(image.shape[1] * scale), round(image.shape[0] * scale)),
            interpolation=cv2.INTER_AREA,
        )
        cv2.imwrite(str(out / "images" / info["file_name"]), small)
        out_images.append({**info, "width": small.shape[1], "height": small.shape[0]})
        for a in anns_by_image.get(info["id"], []):
            x, y, w, h = (v * scale for v in a["bbox"])
            out_anns.append({**a, "bbox": [x, y, w, h], "area": w * h})
    used = {a["category_id"] for a in out_anns}
    categories = [c for c in data["categories"] if c["id"] in used]
    path = out / name
    path.write_text(
        json.dumps({"images": out_images, "annotations": out_anns, "categories": categories})
    )
    return path


def tiny_model_section() -> dict[str, Any]:
    """The tests' tiny model: mobilenet_v3_large_320_fpn from scratch at 160 px, light sampling."""
    return {
        "arch": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "weights": "none",
        "min_size": 160,
        "max_size": 192,
        "box_batch_size_per_image": 64,
        "rpn_batch_size_per_image": 64,
    }


def tiny_config(train_json: Path, val_json: Path | None, out_dir: Path, **sections: dict) -> Config:
    """mobilenet_v3_large_320_fpn at 160 px with light sampling: a few seconds per epoch."""
    values: dict[str, Any] = {
        "data": {
            "train_annotations": str(train_json),
            "val_annotations": str(val_json or ""),
            "num_workers": 0,
        },
        "model": tiny_model_section(),
        "augment": {"hflip": 0.5, "brightness_contrast": 0.3},
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "lr": 0.01,
            "warmup_iters": 2,
            "seed": 0,
            "out_dir": str(out_dir),
            "name": "t",
        },
        "eval": {"grid_images": 2},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    return config_from_dict(values)


def stop_at_call(monkeypatch, train_module, call: int):
    """Make the trainer's between-batches stop check say "stopped by test" at its ``call``-th
    call; returns the real check, to put back before resuming."""
    calls = {"n": 0}
    real_should_stop = train_module._should_stop

    def should_stop(*args):
        calls["n"] += 1
        return "stopped by test" if calls["n"] == call else real_should_stop(*args)

    monkeypatch.setattr(train_module, "_should_stop", should_stop)
    return real_should_stop
