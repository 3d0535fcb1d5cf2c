"""``detector predict MODEL.onnx PATH``: run the deploy runtime on an image, a folder or a video.

Writes annotated images (or an annotated video) and the detections as a COCO results JSON. Only
the torch-free runtime is used (numpy, OpenCV, onnxruntime), as on the vehicle.

Outputs in ``--out`` (which may not be, or be inside, the input folder; existing files are
replaced only with ``--overwrite``, and never written through a symlink):

* ``results.json``: COCO detection results, ``[{"image_id", "category_id", "bbox": [x, y, w, h],
  "score"}, ...]``; ``category_id`` is the model's COCO category id (metadata ``category_ids``),
  else the model label (1..C);
* ``images.json``: a COCO file with the ``images`` (id, file_name, width, height) and
  ``categories`` the results refer to and no annotations, so ``COCO("images.json").loadRes(
  "results.json")`` works; with ``--annotations GT.json`` the image ids are GT's (matched on file
  name) and results can be evaluated against it;
* ``images/<name>`` annotated images, or ``<video stem>_annotated.mp4``.

Images that cannot be used (unreadable, truncated, over the pixel limit, outside the model's
size limits) are skipped and listed by name with the reason.
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

from . import prelabel
from .runtime import (
    Detections,
    Detector,
    ImageError,
    InputError,
    ModelError,
    ProviderError,
    check_frame,
    draw_detections,
    read_image,
)
from .runtime.arguments import add_provider_arguments, detector_options
from .runtime.progress import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
RESULT_FILES = ("results.json", "images.json")
DEFAULT_SCORE = 0.5  # for a model without per-class thresholds


class OutputError(OSError):
    """The output folder or a file in it cannot be written safely."""


@dataclass
class PredictSummary:
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    detections: int = 0
    per_class: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # time spent in Detector.predict
    results_path: Path | None = None
    annotated: Path | None = None
    provider: str = ""
    threshold: str = ""

    def line(self) -> str:
        classes = ", ".join(f"{name} {n}" for name, n in self.per_class.most_common()) or "none"
        rate = f"{1000 * self.seconds / self.images:.1f} ms/image" if self.images else "no images"
        skipped = f" ({len(self.skipped)} unreadable, skipped)" if self.skipped else ""
        where = f"; annotated: {self.annotated}" if self.annotated else ""
        listed = "".join(f"\n  skipped {s}" for s in self.skipped[:20])
        more = f"\n  ... and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
        return (
            f"predict: {self.images} images{skipped}, {self.detections} detections with "
            f"{self.threshold} ({classes}), {rate} on {self.provider}; results: "
            f"{self.results_path}{where}{listed}{more}"
        )


@dataclass
class ImageResult:
    path: Path
    frame: np.ndarray
    detections: Detections


# ---- safe output -----------------------------------------------------------------------------


def check_output_folder(source: Path, out: Path) -> None:
    """Refuse an output folder that is, or is inside, the input folder (symlinks resolved)."""
    if not source.is_dir():
        return  # a single file: the per-file checks keep it from being overwritten
    src = source.resolve()
    for folder in (out, out / "images"):
        target = folder.resolve()
        if target == src or src in target.parents:
            raise OutputError(
                f"--out {out}: {folder} resolves to {target}, inside the input folder {src}; "
                "predict never writes into its input: choose another --out"
            )


def check_target(path: Path, overwrite: bool, source_files: set[Path] | None = None) -> None:
    """Refuse writing over an existing file (without --overwrite), an input file or a symlink."""
    if path.is_symlink():
        raise OutputError(f"{path}: is a symlink; predict does not write through links")
    if source_files and path.resolve() in source_files:
        raise OutputError(f"{path}: is one of the input images; choose another --out")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it, or another --out")


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(temp_path)`` then rename over ``path``; a failed write leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{path}: cannot write ({e.strerror or e}); disk full?") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any, overwrite: bool = False) -> None:
    check_target(path, overwrite)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write)


def write_image(path: Path, image: np.ndarray, overwrite: bool = False) -> None:
    check_target(path, overwrite)

    def write(tmp: str) -> None:
        if not cv2.imwrite(tmp, image):
            raise OutputError(f"{path}: cv2.imwrite failed (disk full or not writable?)")

    _replace_atomically(path, write)


# ---- detection -------------------------------------------------------------------------------


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


def _read(path: Path) -> tuple[np.ndarray | None, str]:
    """(frame, "") or (None, why it cannot be used)."""
    try:
        return check_frame(read_image(path)), ""
    except ImageError as e:
        return None, str(e).removeprefix(f"{path}: ")
    except InputError as e:
        return None, str(e).removeprefix("frame 0: ")


def detect_images(
    detector: Detector,
    paths: list[Path],
    summary: PredictSummary,
    *,
    chunk: int | None = None,
    show_progress: bool = True,
) -> Iterator[ImageResult]:
    """Detections per readable image, in order; unusable images are logged and listed in summary."""
    chunk = chunk or max(1, detector.batch_size) * 4
    with progress(len(paths), "predict", "img", show_progress) as bar:
        for start in range(0, len(paths), chunk):
            frames, kept = [], []
            for path in paths[start : start + chunk]:
                frame, why = _read(path)
                if frame is None:
                    log.warning("%s: %s; skipped", path, why)
                    summary.skipped.append(f"{path}: {why}")
                    continue
                frames.append(frame)
                kept.append(path)
            if frames:
                t = time.perf_counter()
                dets = detector.predict(frames)
                summary.seconds += time.perf_counter() - t
                for path, frame, det in zip(kept, frames, dets, strict=True):
                    yield ImageResult(path, frame, det)
            bar.update(min(chunk, len(paths) - start))


def predict_images(
    detector: Detector,
    paths: list[Path],
    out: Path,
    *,
    annotations: Path | None = None,
    draw: bool = True,
    chunk: int | None = None,
    overwrite: bool = False,
) -> PredictSummary:
    summary = _new_summary(detector)
    gt_ids = _gt_ids(annotations) if annotations else None
    if gt_ids is not None:
        for path in [p for p in paths if p.name not in gt_ids]:
            log.warning("%s: not in %s, skipped", path.name, annotations)
            summary.skipped.append(f"{path}: not in {annotations}")
        paths = [p for p in paths if p.name in gt_ids]
    image_dir = out / "images"
    _check_targets(out, paths if draw else [], overwrite)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    if draw:
        summary.annotated = image_dir
    for index, item in enumerate(detect_images(detector, paths, summary, chunk=chunk), start=1):
        image_id = gt_ids[item.path.name] if gt_ids is not None else index
        h, w = item.frame.shape[:2]
        images.append({"id": image_id, "file_name": item.path.name, "height": h, "width": w})
        results.extend(coco_results(item.detections, image_id, detector))
        _count(summary, item.detections)
        if draw:
            drawn = draw_detections(item.frame, item.detections)
            write_image(image_dir / item.path.name, drawn, overwrite)
    _finish(detector, out, results, images, summary, overwrite)
    return summary


def _check_targets(out: Path, paths: list[Path], overwrite: bool) -> None:
    """Every file predict will write, checked before the first image is run."""
    sources = {p.resolve() for p in paths}
    for name in RESULT_FILES:
        check_target(out / name, overwrite)
    for path in paths:
        check_target(out / "images" / path.name, overwrite, sources)


def _new_summary(detector: Detector) -> PredictSummary:
    return PredictSummary(provider=detector.provider, threshold=detector.describe_threshold())


def _count(summary: PredictSummary, det: Detections) -> None:
    summary.images += 1
    summary.detections += len(det)
    summary.per_class.update(det.names)


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
    detector: Detector, video: Path, out: Path, *, draw: bool = True, overwrite: bool = False
) -> PredictSummary:
    summary = _new_summary(detector)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise InputError(f"{video}: cannot open the video (unknown codec or not a video)")
    for name in RESULT_FILES:
        check_target(out / name, overwrite)
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
        with progress(total, "predict", "frame") as bar:
            for frames in _video_frames(cap, max(1, detector.batch_size)):
                t = time.perf_counter()
                dets = detector.predict(frames)
                summary.seconds += time.perf_counter() - t
                for frame, det in zip(frames, dets, strict=True):
                    index += 1
                    h, w = frame.shape[:2]
                    name = f"{video.name}#frame{index:06d}"
                    images.append({"id": index, "file_name": name, "height": h, "width": w})
                    results.extend(coco_results(det, index, detector))
                    _count(summary, det)
                    if draw:
                        if writer is None:
                            size = (w, h)
                            writer, summary.annotated = _open_writer(
                                out, video, fps, size, overwrite
                            )
                        drawn = draw_detections(frame, det)
                        writer.write(drawn if (w, h) == size else cv2.resize(drawn, size))
                bar.update(len(frames))
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    _check_video_written(summary.annotated)
    _finish(detector, out, results, images, summary, overwrite)
    return summary


def _open_writer(
    out: Path, video: Path, fps: float, size: tuple[int, int], overwrite: bool
) -> tuple[cv2.VideoWriter, Path]:
    for suffix, codec in ((".mp4", "mp4v"), (".avi", "MJPG")):
        path = out / f"{video.stem}_annotated{suffix}"
        check_target(path, overwrite)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, path
    raise OutputError(f"OpenCV cannot write a video in {out} (no mp4v or MJPG encoder)")


def _check_video_written(path: Path | None) -> None:
    # VideoWriter.write returns nothing: a full disk shows only as a missing or empty file.
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        raise OutputError(f"{path}: the annotated video was not written (disk full?)")


def _finish(
    detector: Detector,
    out: Path,
    results: list,
    images: list,
    summary: PredictSummary,
    overwrite: bool,
) -> None:
    summary.results_path = out / "results.json"
    write_json(summary.results_path, results, overwrite)
    coco = {
        "info": {"description": f"images predicted by {detector.path.name}"},
        "images": images,
        "annotations": [],
        "categories": _categories(detector),
    }
    write_json(out / "images.json", coco, overwrite)


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
    parser.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output folder (not the input's)"
    )
    parser.add_argument(
        "--score",
        type=float,
        default=None,
        help="keep (draw and write) detections scoring at least this, for every class "
        f"(default: the model's per-class thresholds if it has them, else {DEFAULT_SCORE})",
    )
    add_provider_arguments(parser)
    parser.add_argument(
        "--annotations",
        type=Path,
        default=None,
        help="COCO JSON of these images: use its image ids (matched on file name)",
    )
    parser.add_argument("--no-draw", action="store_true", help="write only the JSON files")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files of an earlier run in --out"
    )
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


def open_detector(args: argparse.Namespace) -> Detector:
    detector = Detector(args.model, **detector_options(args), score_threshold=args.score)
    if args.score is None and detector.info.class_score_thresholds is None:
        detector.set_score_threshold(DEFAULT_SCORE)
    return detector


def run(args: argparse.Namespace) -> int:
    source: Path = args.source
    if not source.exists():
        print(f"predict: error: {source}: no such file or folder", file=sys.stderr)
        return 2
    try:
        check_output_folder(source, args.out)
        detector = open_detector(args)
        draw, overwrite = not args.no_draw, args.overwrite
        if source.is_file() and source.suffix.lower() in VIDEO_SUFFIXES:
            if args.format:
                raise InputError("--format writes pre-annotations of images; give a folder")
            summary = predict_video(detector, source, args.out, draw=draw, overwrite=overwrite)
        else:
            paths = list_images(source)
            if not paths:
                print(
                    f"predict: error: {source}: no images ({', '.join(IMAGE_SUFFIXES)})",
                    file=sys.stderr,
                )
                return 2
            if args.format:
                for path in prelabel.output_paths(args.out, args.format):
                    check_target(path, overwrite)
            summary = predict_images(
                detector,
                paths,
                args.out,
                annotations=args.annotations,
                draw=draw,
                overwrite=overwrite,
            )
            if args.format:
                _write_prelabels(args, detector)
    except (ModelError, InputError, ProviderError, FileNotFoundError, OSError, ValueError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0 if summary.images else 1


if __name__ == "__main__":  # python -m detector.predict
    _parser = argparse.ArgumentParser(prog="detector predict", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(_parser.parse_args()))
