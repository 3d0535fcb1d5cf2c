"""A small trained checkpoint and its ONNX exports, shared by test_export.py and test_runtime.py.

Everything is made once per pytest session in ``<basetemp>/onnx_fixtures`` (both test modules
ask for the same files; a second request finds them there).

The checkpoint is a fasterrcnn_mobilenet_v3_large_320_fpn for one class ("raccoon") trained for
a few dozen SGD steps on 4 real raccoon images. No pretrained weights exist offline, and a random
MobileNetV3 behind frozen batch-norm statistics outputs ~1e-8 everywhere (every proposal then gets
the same score), so the backbone's batch-norm statistics are first calibrated on the training
images (as a data-dependent initialisation), then the backbone is frozen and the RPN and box
heads train. The result detects raccoons with varied scores and finds nothing on a gray frame.
"""

from __future__ import annotations

import contextlib
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"
TRAIN = ["raccoon-1", "raccoon-10", "raccoon-100", "raccoon-101"]
# Sizes 274x184, 418x625 (its resized height rounds differently in float32: the trap the integer
# resize rule removes), 960x768 and 194x259; the trained model finds raccoons in all four.
VAL = ["raccoon-110", "raccoon-114", "raccoon-111", "raccoon-102"]

_reports: dict[str, Any] = {}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """One intra-op thread: on 2 shared cores, OpenMP spinning makes 2 threads up to 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def work_dir(tmp_path_factory: Any) -> Path:
    path = Path(tmp_path_factory.getbasetemp()) / "onnx_fixtures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def raccoon_image(datasets: Path, name: str) -> np.ndarray:
    """HxWx3 uint8 BGR."""
    frame = cv2.imread(str(datasets / "raccoon-voc" / "images" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    assert frame is not None, name
    return frame


def raccoon_boxes(datasets: Path, name: str) -> list[list[float]]:
    root = ET.parse(datasets / "raccoon-voc" / "annotations" / f"{name}.xml").getroot()
    return [
        [float(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        for obj in root.iter("object")
    ]


def val_dir(work: Path, datasets: Path) -> Path:
    """A folder holding the validation images (what ``--images`` points at)."""
    folder = work / "val_images"
    if not folder.is_dir():
        tmp = work / "val_images.tmp"
        tmp.mkdir(exist_ok=True)
        for name in VAL:
            shutil.copy(datasets / "raccoon-voc" / "images" / f"{name}.jpg", tmp / f"{name}.jpg")
        tmp.rename(folder)
    return folder


def to_tensor(frame_bgr: np.ndarray) -> Any:
    import torch

    rgb = np.ascontiguousarray(frame_bgr[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)


def trained_checkpoint(work: Path, datasets: Path) -> Path:
    path = work / "raccoon_mbv3_320.pt"
    if path.is_file():
        return path
    import torch

    from detector.config import config_from_dict
    from detector.model import build_model, save_checkpoint

    with torch_threads(1):
        torch.manual_seed(0)
        cfg = config_from_dict(
            {"model": {"arch": ARCH, "weights": "none", "freeze_backbone": False}}
        )
        model, _ = build_model(cfg.model, ["raccoon"])
        images = [to_tensor(raccoon_image(datasets, n)) for n in TRAIN]
        targets = [
            {
                "boxes": torch.tensor(raccoon_boxes(datasets, n)),
                "labels": torch.ones(len(raccoon_boxes(datasets, n)), dtype=torch.int64),
            }
            for n in TRAIN
        ]
        # Calibrate the backbone's batch-norm statistics on the images (cumulative average).
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
                module.reset_running_stats()
        model.backbone.train()
        with torch.no_grad():
            batch, _ = model.transform(images)
            model.backbone(batch.tensors)
            model.backbone(batch.tensors.flip(-1))
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model.train()
        model.backbone.eval()
        # Fewer sampled RoIs and proposals than the defaults: a few seconds on 2 CPU cores.
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 64
        model.rpn._pre_nms_top_n["training"] = 300
        model.rpn._post_nms_top_n["training"] = 300
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.015, momentum=0.9)
        for _ in range(30):
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        save_checkpoint(
            path,
            {
                "model": model.state_dict(),
                "arch": ARCH,
                "class_names": ["raccoon"],
                "category_ids": [1],
                "config": cfg.to_dict(),
                "config_hash": cfg.hash(),
                "epoch": 0,
            },
        )
    return path


def exported(
    work: Path, datasets: Path, name: str, parity_limit: int = 4, **options: Any
) -> tuple[Path, Any]:
    """Export the trained checkpoint once per session with ``options`` (export_onnx keywords).

    Returns ``(path, ExportReport)``; the report is None when another test already wrote the
    file (test_export.py writes ``b1.onnx`` through ``detector export``). The export's defaults
    apply: raw uint8 BGR input, any frame size, simplified.
    """
    out = work / f"{name}.onnx"
    if not out.is_file():
        from detector.export import export_onnx

        checkpoint = trained_checkpoint(work, datasets)
        with torch_threads(1):
            _reports[name] = export_onnx(
                checkpoint,
                out,
                parity_images=val_dir(work, datasets),
                parity_limit=parity_limit,
                **options,
            )
    return out, _reports.get(name)
