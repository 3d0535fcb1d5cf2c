"""``detector predict MODEL.onnx PATH``: run the deploy runtime on an image, a folder or a video.

Writes annotated images (or an annotated video) and the detections as a COCO results JSON. Only
the torch-free runtime is used (numpy, OpenCV, onnxruntime), as on the vehicle.

Outputs in ``--out``:

* ``results.json``: COCO detection results, ``[{"image_id", "category_id", "bbox": [x, y, w, h],
  "score"}, ...]``; ``category_id`` is the model's COCO category id (metadata ``category_ids``),
  else the model label (1..C);
* ``images.json``: a COCO file with the ``images`` (id, file_name, width, height) and
  ``categories`` the results refer to and no annotations, so ``COCO("images.json").loadRes(
  "results.json")`` works; with ``--annotations GT.json`` the image ids are GT's (matched on file
  name) and results can be evaluated against it;
* ``images/<name>`` annotated images, or ``<video stem>_annotated.mp4``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from . import prelabel
from .runtime import (
    Detections,
    Detector,
    InputError,
    ModelError,
    ProviderError,
    check_frame,
    draw_detections,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")


@dataclass
class PredictSummary:
    images: int = 0
    skipped: list[str] = field(default_factory=list)
    detections: int = 0
    per_class: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # time spent in Detector.predict
    results_path: Path | None = None
    annotated: Path | None = None
    provider: str = ""

    def line(self, score: float) -> str:
        classes = ", ".join(f"{name} {n}" for name, n in self.per_class.most_common()) or "none"
        rate = f"{1000 * self.seconds / self.images:.1f} ms/image" if self.images else "no images"
        skipped = f" ({len(self.skipped)} unreadable, skipped)" if self.skipped else ""
        where = f"; annotated: {self.annotated}" if self.annotated else ""
        return (
            f"predict: {self.images} images{skipped}, {self.detections} detections with score >= "
            f"{score:g} ({classes}), {rate} on {self.provider}; results: {self.results_path}{where}"
        )


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def coco_results(det: Detections, image_id: int, detector: Detector) -> list[dict[str, Any]]:
    """One image's detections as COCO results entries (bbox x, y, width, height)."""
    out = []
    for box, score, label in zip(det.boxes, det.scores, det.labels, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append(
            {
                "image_id": int(image_id),
                "category_id": detector.category_id(int(label)),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(score), 5),
            }
        )
    return out


def _categories(detector: Detector) -> list[dict[str, Any]]:
    return [
        {"id": detector.category_id(i + 1), "name": name}
        for i, name in enumerate(detector.class_names)
    ]


def list_images(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _gt_ids(annotations: Path) -> dict[str, int]:
    with open(annotations, encoding="utf-8") as f:
        coco = json.load(f)
    ids: dict[str, int] = {}
    for image in coco.get("images", []):
        name = str(image["file_name"]).replace("\\", "/")
        ids[name] = int(image["id"])
        ids.setdefault(name.rsplit("/", 1)[-1], int(image["id"]))
    return ids


def _read(path: Path) -> np.ndarray | None:
    # IMREAD_COLOR applies the EXIF orientation and gives 8-bit BGR for gray/alpha/16-bit files.
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        return None
    try:
        return check_frame(frame)
    except InputError:
        return None


def predict_images(
    detector: Detector,
    paths: list[Path],
    out: Path,
    *,
    annotations: Path | None = None,
    draw: bool = True,
    chunk: int | None = None,
) -> PredictSummary:
    summary = PredictSummary(provider=detector.provider)
    gt_ids = _gt_ids(annotations) if annotations else None
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    image_dir = out / "images"
    if draw:
        image_dir.mkdir(parents=True, exist_ok=True)
        summary.annotated = image_dir
    chunk = chunk or max(1, detector.batch_size) * 4
    next_id = 1
    with tqdm(total=len(paths), unit="img", desc="predict", disable=None) as bar:
        for start in range(0, len(paths), chunk):
            frames, kept = [], []
            for path in paths[start : start + chunk]:
                frame = _read(path)
                if frame is None:
                    log.warning(
                        "%s: not a readable image (or outside the size limits), skipped", path
                    )
                    summary.skipped.append(str(path))
                    continue
                if gt_ids is not None and path.name not in gt_ids:
                    log.warning("%s: not in %s, skipped", path.name, annotations)
                    summary.skipped.append(str(path))
                    continue
                frames.append(frame)
                kept.append(path)
            if frames:
                t = time.perf_counter()
                dets = detector.predict(frames)
                summary.seconds += time.perf_counter() - t
                for path, frame, det in zip(kept, frames, dets, strict=True):
                    if gt_ids is not None:
                        image_id = gt_ids[path.name]
                    else:
                        image_id, next_id = next_id, next_id + 1
                    images.append(
                        {
                            "id": image_id,
                            "file_name": path.name,
                            "height": int(frame.shape[0]),
                            "width": int(frame.shape[1]),
                        }
                    )
                    results.extend(coco_results(det, image_id, detector))
                    summary.images += 1
                    summary.detections += len(det)
                    summary.per_class.update(det.names)
                    if draw and not cv2.imwrite(
                        str(image_dir / path.name), draw_detections(frame, det)
                    ):
                        cv2.imwrite(
                            str((image_dir / path.name).with_suffix(".jpg")),
                            draw_detections(frame, det),
                        )
            bar.update(min(chunk, len(paths) - start))
    _finish(detector, out, results, images, summary)
    return summary


def _video_frames(cap: cv2.VideoCapture, n: int) -> Iterator[list[np.ndarray]]:
    while True:
        frames = []
        for _ in range(n):
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
        if not frames:
            return
        yield frames


def predict_video(
    detector: Detector, video: Path, out: Path, *, draw: bool = True
) -> PredictSummary:
    summary = PredictSummary(provider=detector.provider)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise InputError(f"{video}: cannot open the video (unknown codec or not a video)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if 0 < fps < 1000 else 30.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer = None
    size = (0, 0)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    index = 0
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tqdm(total=total, unit="frame", desc="predict", disable=None) as bar:
            for frames in _video_frames(cap, max(1, detector.batch_size)):
                t = time.perf_counter()
                dets = detector.predict(frames)
                summary.seconds += time.perf_counter() - t
                for frame, det in zip(frames, dets, strict=True):
                    index += 1
                    h, w = frame.shape[:2]
                    images.append(
                        {
                            "id": index,
                            "file_name": f"{video.name}#frame{index:06d}",
                            "height": h,
                            "width": w,
                        }
                    )
                    results.extend(coco_results(det, index, detector))
                    summary.images += 1
                    summary.detections += len(det)
                    summary.per_class.update(det.names)
                    if draw:
                        if writer is None:
                            size = (w, h)
                            writer, summary.annotated = _open_writer(out, video, fps, size)
                        drawn = draw_detections(frame, det)
                        writer.write(drawn if (w, h) == size else cv2.resize(drawn, size))
                bar.update(len(frames))
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    _finish(detector, out, results, images, summary)
    return summary


def _open_writer(
    out: Path, video: Path, fps: float, size: tuple[int, int]
) -> tuple[cv2.VideoWriter, Path]:
    for suffix, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
        path = out / f"{video.stem}_annotated{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, path
    raise OSError(f"OpenCV cannot write a video in {out} (no mp4v or MJPG encoder)")


def _finish(
    detector: Detector, out: Path, results: list, images: list, summary: PredictSummary
) -> None:
    summary.results_path = out / "results.json"
    _atomic_write_json(summary.results_path, results)
    _atomic_write_json(
        out / "images.json",
        {
            "info": {"description": f"images predicted by {detector.path.name}"},
            "images": images,
            "annotations": [],
            "categories": _categories(detector),
        },
    )


def _refuse_existing(paths: list[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; move it away or choose another --out")


def _write_prelabels(args: argparse.Namespace, detector: Detector) -> None:
    """The pre-annotation files, from the results.json and images.json just written."""
    with open(args.out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    with open(args.out / "images.json", encoding="utf-8") as f:
        coco = json.load(f)
    written = prelabel.write_prelabels(
        args.out,
        args.format,
        coco["images"],
        results,
        coco["categories"],
        detector.path.name,
        args.image_url_prefix,
    )
    print(f"pre-annotations: {', '.join(str(p) for p in written)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX model written by `detector export`")
    parser.add_argument("source", type=Path, help="an image, a folder of images, or a video file")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument(
        "--score",
        type=float,
        default=0.5,
        help="keep (draw and write) detections scoring at least this",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="execution providers in order (tensorrt cuda cpu; default: all three)",
    )
    parser.add_argument("--trt-cache", type=Path, default=None, help="TensorRT engine cache folder")
    parser.add_argument(
        "--annotations",
        type=Path,
        default=None,
        help="COCO JSON of these images: use its image ids (matched on file name)",
    )
    parser.add_argument("--no-draw", action="store_true", help="write only the JSON files")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=prelabel.FORMATS,
        default=None,
        help="also write pre-annotations for a labelling tool: cvat.xml (CVAT for images 1.1), "
        "labelstudio.json (tasks with predictions), coco.json (with scores) in --out",
    )
    parser.add_argument(
        "--image-url-prefix",
        default=prelabel.LABEL_STUDIO_URL_PREFIX,
        help="Label Studio: prefix of each task's image URL (default: local-files storage)",
    )


def run(args: argparse.Namespace) -> int:
    source: Path = args.source
    if not source.exists():
        print(f"predict: error: {source}: no such file or folder", file=sys.stderr)
        return 2
    try:
        detector = Detector(
            args.model,
            providers=args.providers,
            trt_cache_dir=args.trt_cache,
            score_threshold=args.score,
        )
        if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
            if args.format:
                raise InputError("--format writes pre-annotations of images; give a folder")
            summary = predict_video(detector, source, args.out, draw=not args.no_draw)
        else:
            paths = list_images(source)
            if not paths:
                print(
                    f"predict: error: {source}: no images ({', '.join(IMAGE_SUFFIXES)})",
                    file=sys.stderr,
                )
                return 2
            if args.format:
                _refuse_existing(prelabel.output_paths(args.out, args.format))
            summary = predict_images(
                detector, paths, args.out, annotations=args.annotations, draw=not args.no_draw
            )
            if args.format:
                _write_prelabels(args, detector)
    except (ModelError, InputError, ProviderError, FileNotFoundError, OSError, ValueError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(summary.line(args.score))
    return 0 if summary.images else 1


if __name__ == "__main__":  # python -m detector.predict
    _parser = argparse.ArgumentParser(prog="detector predict", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(_parser.parse_args()))
