"""Fault injection, bad inputs: the pre-flight check and the loader against broken data sets.

Every case ends one of two ways: the run stops before training with a message that names the
file, the record and what to do (all problems of a set in ONE message), or the problem is safe to
skip and the skip is counted in the log. Sets are tiny synthetic ones written into tmp_path.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import resource
import shutil
import struct
import types
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from coco_fixtures import tiny_model_section
from PIL import Image

from detector import cli
from detector.config import config_from_dict
from detector.convert import ConversionError, convert
from detector.data import DatasetError, DetectionDataset, load_coco
from detector.fileio import ImageReadError, read_image_rgb
from detector.preflight import preflight
from detector.train import train

REPO = Path(__file__).resolve().parents[1]
LF = "label-formats/datasets"

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# helpers


def noise_jpeg(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return {"file_name": path.name, "width": width, "height": height}


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A valid 1-bit grayscale PNG of width x height: ~50 KB on disk, 1.2 GB once decoded to RGB.

    Written row by row through zlib, so the test itself never holds the image in memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(path: Path, raw_width: int = 64, raw_height: int = 48) -> None:
    """Stored landscape raw_width x raw_height, EXIF orientation 6: displayed portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = np.zeros((raw_height, raw_width, 3), np.uint8)
    raw[:, : raw_width // 4] = (255, 0, 0)
    Image.fromarray(raw).save(path, exif=exif, quality=95)


def write_coco(
    path: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": categories or [{"id": 1, "name": "deer"}],
            }
        )
    )
    return path


def box(ann_id: int, image_id: int, bbox: list[float], category: int = 1, **extra: Any) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category,
        "bbox": bbox,
        "area": float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0,
        "iscrowd": 0,
        **extra,
    }


def tiny_yaml(path: Path, train_json: Path, out_dir: Path, **sections: dict) -> Path:
    """The tests' tiny model (coco_fixtures.tiny_config) as a YAML file for the command line."""
    values: dict[str, Any] = {
        "data": {"train_annotations": str(train_json), "num_workers": 0},
        "model": tiny_model_section(),
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "warmup_iters": 2,
            "out_dir": str(out_dir),
            "name": "bad",
        },
        "eval": {"grid_images": 0},
    }
    for section, updates in sections.items():
        values.setdefault(section, {}).update(updates)
    config_from_dict(values)  # fail here, not in the CLI, if the test itself is wrong
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def cli_main():
    return cli.main


def load_tool(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# the pre-flight check: every problem, one message


def record_decodes(monkeypatch) -> list[str]:
    """Names of the image files whose pixels are decoded (Pillow's load, OpenCV's imread)."""
    from PIL import ImageFile

    names: list[str] = []
    real_load, real_imread = ImageFile.ImageFile.load, cv2.imread

    def load(self):
        names.append(Path(getattr(self, "filename", "") or "").name)
        return real_load(self)

    def imread(path, *args):
        names.append(Path(path).name)
        return real_imread(path, *args)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(cv2, "imread", imread)
    return names


def test_preflight_lists_every_image_problem_in_one_message(tmp_path, caplog, monkeypatch):
    root = tmp_path / "set"
    images_dir = root / "images"
    records = []
    for i, name in enumerate(["ok1.jpg", "ok2.jpg", "corrupt.jpg", "truncated.jpg"]):
        records.append({"id": i + 1, **noise_jpeg(images_dir / name, seed=i)})
    (images_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 20)
    data = (images_dir / "truncated.jpg").read_bytes()
    (images_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    records.append({"id": 5, "file_name": "missing.jpg", "width": 64, "height": 48})
    huge_png(images_dir / "huge.png")
    records.append({"id": 6, "file_name": "huge.png", "width": 20000, "height": 20000})
    exif_rotated_jpeg(images_dir / "rotated.jpg")  # displayed 48x64; the JSON keeps the raw size
    records.append({"id": 7, "file_name": "rotated.jpg", "width": 64, "height": 48})
    noise_jpeg(root / "secret.jpg")  # outside the image folder: must never be read
    records.append({"id": 8, "file_name": "../secret.jpg", "width": 64, "height": 48})
    records.append({"id": 9, "file_name": str(root / "secret.jpg"), "width": 64, "height": 48})
    noise_jpeg(images_dir / "unlisted.jpg")  # present but in no record: a warning only
    anns = [box(1, 1, [5, 5, 20, 20]), box(2, 2, [5, 5, 20, 20]), box(3, 7, [40, 10, 20, 30])]
    cset = load_coco(write_coco(root / "train.json", records, anns))

    decoded = record_decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="detector"), pytest.raises(DatasetError) as err:
        preflight(cset, progress=False)
    assert "ok1.jpg" in decoded and "huge.png" not in decoded  # refused from its header
    message = str(err.value)
    assert "7 of 9 images are unusable" in message
    assert str(root / "train.json") in message and "tools/validate.py" in message
    expectations = {
        "corrupt.jpg": "cannot be read",
        "truncated.jpg": "truncated",
        "missing.jpg": "listed but not found",
        "huge.png": "downscale it",
        "rotated.jpg": "EXIF orientation 6",
        "'../secret.jpg'": "escapes the image folder",
        str(root / "secret.jpg"): "absolute path",
    }
    lines = message.splitlines()
    for name, what in expectations.items():
        hits = [line for line in lines if name in line]
        assert hits and any(what in line for line in hits), (name, what, message)
    assert "ok1.jpg" not in message and "unlisted.jpg" not in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unlisted.jpg" in w and "not listed" in w for w in warnings), warnings


def test_annotation_problems_are_all_listed_before_anything_trains(tmp_path, cli_main, capsys):
    """load_coco alone stops at the first duplicate id; the pre-flight lists them all."""
    root = tmp_path / "set"
    records = [{"id": i, **noise_jpeg(root / "images" / f"{i}.jpg", seed=i)} for i in (1, 2, 3)]
    records.append({"id": 3, **noise_jpeg(root / "images" / "dup.jpg", seed=9)})  # id 3 twice
    categories = [{"id": 1, "name": "deer"}, {"id": 2, "name": "sign"}]
    anns = [
        box(1, 1, [5, 5, 20, 20]),
        box(1, 2, [5, 5, 20, 20]),  # annotation id 1 twice
        box(3, 2, [5, 5, 20, 20], category=99),  # no such category
        box(4, 3, [1, 2, 3]),  # not four numbers
        box(5, 1, [30, 5, 20, 20], category=0),  # 0-based ids (YOLO indices copied as-is)
    ]
    train_json = write_coco(root / "train.json", records, anns, categories)
    config = tiny_yaml(tmp_path / "bad.yaml", train_json, tmp_path / "runs")

    assert cli_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pre-flight check failed")
    for expected in (
        "[duplicate_image_id] image id 3 (dup.jpg)",
        "[duplicate_ann_id] annotation 1",
        "[unknown_category] annotation 3",
        "category_id 99",
        "[bad_bbox] annotation 4",
        "is not four numbers",
        "[zero_based_category_ids]",
        "nothing was trained",
        "--fix",
    ):
        assert expected in err, (expected, err)
    assert not list((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.parametrize(
    ("which", "content", "expected"),
    [
        ("train", "", "not valid JSON (line 1, column 1"),
        ("train", '{"images": [{"id": 1,', "not valid JSON"),
        ("train", "[]", "the top level must be an object"),
        ("train", '{"images": {}, "categories": []}', "'images' is a dict, not a list"),
        ("val", "{", "not valid JSON"),
    ],
)
def test_empty_or_malformed_json_names_the_file(
    tmp_path, cli_main, capsys, which, content, expected
):
    root = tmp_path / "set"
    good = write_coco(
        root / "good.json",
        [{"id": 1, **noise_jpeg(root / "images" / "a.jpg")}],
        [box(1, 1, [5, 5, 20, 20])],
    )
    bad = root / f"{which}.json"
    bad.write_text(content)
    data = {"val_annotations": str(bad)} if which == "val" else {}
    config = tiny_yaml(
        tmp_path / "c.yaml", good if which == "val" else bad, tmp_path / "runs", data=data
    )
    assert cli_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err


def test_boxes_stored_as_xyxy_stop_the_run_with_the_command_that_converts_them(tmp_path):
    root = tmp_path / "set"
    records = [{"id": i, **noise_jpeg(root / "images" / f"{i}.jpg", seed=i)} for i in (1, 2, 3)]
    # [x1, y1, x2, y2] written into COCO's [x, y, w, h]: x + w runs past the 64 px edge
    anns = [box(i, i, [30, 20, 60, 45]) for i in (1, 2, 3)] + [box(4, 1, [2, 3, 20, 30])]
    train_json = write_coco(root / "train.json", records, anns)
    with pytest.raises(DatasetError) as err:
        preflight(load_coco(train_json), progress=False)
    message = str(err.value)
    fixed = root / "train.xywh.json"
    assert "[bbox_looks_xyxy]" in message and "[x1, y1, x2, y2]" in message
    assert f"python tools/validate.py {train_json} --fix {fixed} --xyxy" in message

    assert (
        load_tool("validate").main(
            [str(train_json), "--fix", str(fixed), "--xyxy", "--no-progress"]
        )
        == 0
    )
    cset = load_coco(fixed)
    preflight(cset, progress=False)  # now clean
    np.testing.assert_allclose(cset.boxes[1], [[30, 20, 60, 45], [2, 3, 20, 30]])


def test_unusual_but_valid_images_and_safe_box_skips_train(tmp_path, caplog):
    """Gray, RGBA, 16-bit, CMYK, palette, PNG named .jpg, EXIF-rotated (labelled on the rotated
    view): all train. Zero-area and off-image boxes are skipped and counted, negatives and
    iscrowd boxes counted; none of them stops the run."""
    images_dir = tmp_path / "set" / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(images_dir / "gray.png"), noise[..., 0])
    cv2.imwrite(str(images_dir / "rgba.png"), np.dstack([noise, np.full((48, 64), 200, np.uint8)]))
    cv2.imwrite(str(images_dir / "deep.png"), noise.astype(np.uint16) * 257)
    cv2.imwrite(str(images_dir / "deep_gray.png"), noise[..., 1].astype(np.uint16) * 257)
    Image.fromarray(noise).convert("CMYK").save(images_dir / "cmyk.jpg")
    Image.fromarray(noise).convert("P").save(images_dir / "palette.png")
    cv2.imwrite(str(images_dir / "tmp.png"), noise)
    (images_dir / "tmp.png").rename(images_dir / "png_named.jpg")
    exif_rotated_jpeg(images_dir / "rotated.jpg")  # displayed 48 wide, 64 high
    noise_jpeg(images_dir / "negative.jpg")
    names = [
        "gray.png",
        "rgba.png",
        "deep.png",
        "deep_gray.png",
        "cmyk.jpg",
        "palette.png",
        "png_named.jpg",
        "rotated.jpg",
        "negative.jpg",
    ]
    records = [
        {"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)
    ]
    records[7].update(width=48, height=64)  # the displayed size: boxes were drawn on that view
    anns = [box(i + 1, i + 1, [8, 6, 30, 24]) for i in range(8)]
    anns += [
        box(20, 1, [10, 10, 0, 12]),  # zero width
        box(21, 2, [100, 80, 10, 10]),  # entirely outside the 64x48 image
        box(22, 3, [1, 1, 40, 30], iscrowd=1),
    ]
    cset = load_coco(write_coco(tmp_path / "set" / "train.json", records, anns))

    with caplog.at_level(logging.INFO, logger="detector"):
        preflight(cset, progress=False)
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert (
        "2 boxes are skipped in training (1 zero or negative width/height, 1 entirely "
        "outside the image)" in log_text
    )
    assert "1 images without boxes, trained as negatives" in log_text
    assert "1 iscrowd boxes" in log_text
    assert "pre-flight: 9 images read, all usable" in log_text
    image, target = DetectionDataset(cset)[7]
    assert image.shape == (3, 64, 48)  # EXIF applied: the view the boxes were drawn on
    assert target["boxes"].tolist() == [[8, 6, 38, 30]]

    caplog.clear()
    cfg = config_from_dict(
        {
            "data": {"train_annotations": str(tmp_path / "set" / "train.json"), "num_workers": 0},
            "model": {
                "arch": "fasterrcnn_mobilenet_v3_large_320_fpn",
                "weights": "none",
                "min_size": 96,
                "max_size": 128,
                "box_batch_size_per_image": 32,
                "rpn_batch_size_per_image": 32,
            },
            "train": {
                "epochs": 1,
                "batch_size": 5,
                "warmup_iters": 1,
                "out_dir": str(tmp_path / "runs"),
                "name": "formats",
            },
        }
    )
    with caplog.at_level(logging.INFO, logger="detector"):
        result = train(cfg, progress=False)
    assert result.stop_reason == "completed" and result.images_seen == 9
    assert any("dropped 2 boxes" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# without the pre-flight: the loader's own errors are still clear


def test_huge_image_is_refused_before_decoding_even_without_preflight(tmp_path, monkeypatch):
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    huge_png(root / "images" / "huge.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoded = record_decodes(monkeypatch)
    with pytest.raises(ImageReadError, match=r"huge\.png: .*too large"):
        read_image_rgb(root / "images" / "huge.png")
    path = write_coco(
        root / "train.json",
        [{"id": 1, "file_name": "huge.png", "width": 20000, "height": 20000}],
        [],
    )
    with pytest.raises(ImageReadError, match="downscale"):
        DetectionDataset(load_coco(path))[0]
    assert "huge.png" not in decoded
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 300_000, f"peak memory grew by {grown_kb / 1024:.0f} MiB: it was decoded"


@pytest.mark.parametrize("name", ["../secret.jpg", "ABSOLUTE"])
def test_escaping_image_path_stops_training_cleanly_without_preflight(
    tmp_path, cli_main, capsys, name
):
    root = tmp_path / "set"
    secret = noise_jpeg(root / "secret.jpg")
    name = str(root / "secret.jpg") if name == "ABSOLUTE" else name
    ok = {"id": 1, **noise_jpeg(root / "images" / "ok.jpg")}
    train_json = write_coco(
        root / "train.json",
        [ok, {"id": 2, **secret, "file_name": name}],
        [box(1, 1, [5, 5, 20, 20]), box(2, 2, [5, 5, 20, 20])],
    )
    config = tiny_yaml(
        tmp_path / "c.yaml",
        train_json,
        tmp_path / "runs",
        data={"preflight": False},
        train={"batch_size": 2},
    )
    assert cli_main(["train", str(config), "--no-progress"]) == 2  # an error line, no traceback
    err = capsys.readouterr().err
    assert f"{name!r}" in err and ("escapes" in err or "absolute" in err), err


# ---------------------------------------------------------------------------------------------
# converters: image names from label files never leave the export folder


def _escape_case(kind: str, src: Path, name: str) -> str | None:
    """Point one image name of the copied export at ``name``; return the format key."""
    if kind == "cvat":
        xml = src / "annotations.xml"
        xml.write_text(xml.read_text().replace('name="birds.jpg"', f'name="{name}"'))
    elif kind == "via_csv":
        (src / "via_region_data.json").unlink()
        csv = src / "via_region_data.csv"
        csv.write_text(csv.read_text().replace("strawberry.jpg,", f"{name},"))
    elif kind == "via_json":
        (src / "via_region_data.csv").unlink()
        via = src / "via_region_data.json"
        via.write_text(
            via.read_text().replace('"filename":"strawberry.jpg"', f'"filename":"{name}"')
        )
    elif kind == "createml":
        for p in src.glob("*.xml"):
            p.unlink()
        data = json.loads((src / "birds.json").read_text())
        data[0]["image"] = name
        (src / "birds.json").write_text(json.dumps(data))
    elif kind == "automl":
        noise_jpeg(src / "images" / "a.jpg")
        (src / "labels.csv").write_text(
            f"TRAIN,{name},Deer,0.1,0.1,,,0.5,0.5,,\nTRAIN,a.jpg,Deer,0.1,0.1,,,0.5,0.5,,\n"
        )
    return {"via_csv": "via", "via_json": "via"}.get(kind, kind)


@pytest.mark.parametrize("kind", ["cvat", "via_csv", "via_json", "createml", "automl"])
@pytest.mark.parametrize("escape", ["../secret.jpg", "ABSOLUTE"])
def test_converters_refuse_image_names_that_escape_the_export(
    shared_datasets, tmp_path, kind, escape
):
    copies = {"cvat": "cvat1.1", "via_csv": "via", "via_json": "via", "createml": "CreateML"}
    src = tmp_path / "export"
    if kind in copies:
        shutil.copytree(shared_datasets / LF / copies[kind], src)
    else:
        src.mkdir()
    secret = tmp_path / "secret.jpg"
    noise_jpeg(secret)
    name = str(secret) if escape == "ABSOLUTE" else "../secret.jpg"
    fmt = _escape_case(kind, src, name)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as err:
        convert(src, out, fmt)
    message = str(err.value)
    assert name in message and ("escapes" in message or "absolute" in message), message
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# records the loader cannot index, sets with nothing to learn from, truncated images
# (hand-made from the real raccoon photos)

RACCOON = "raccoon-voc/images"


def raccoon_set(shared_datasets: Path, root: Path, n: int = 3) -> list[dict[str, Any]]:
    """Copies of the first n raccoon photos in root/images, as COCO image records."""
    records = []
    for i in range(1, n + 1):
        path = root / "images" / f"raccoon-{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_datasets / RACCOON / path.name, path)
        with Image.open(path) as im:
            records.append(
                {"id": i, "file_name": path.name, "width": im.width, "height": im.height}
            )
    return records


def test_missing_or_null_ids_bbox_and_size_are_listed_not_a_traceback(
    shared_datasets, tmp_path, cli_main, capsys
):
    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root)
    records[2]["width"] = None
    anns = [box(1, 1, [10, 10, 100, 100]), box(2, 1, [20, 20, 50, 50])]
    anns += [box(3, 2, [10, 10, 100, 100]), box(4, 2, [10, None, 100, 100])]
    del anns[0]["image_id"]
    del anns[1]["category_id"]
    anns[2]["category_id"] = None
    train_json = write_coco(root / "train.json", records, anns)
    with pytest.raises(DatasetError, match="image id 3: has no valid width/height"):
        load_coco(train_json)
    config = tiny_yaml(tmp_path / "bad.yaml", train_json, tmp_path / "runs")
    assert cli_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pre-flight check failed"), err
    for expected in (
        "annotation 1 (image None): has no image_id",
        "annotation 2 (image 1, raccoon-1.jpg): has no category_id",
        "annotation 3 (image 2, raccoon-2.jpg): has no category_id",
        "[bad_bbox] annotation 4",
        "image id 3 (raccoon-3.jpg): width/height missing",
    ):
        assert expected in err, (expected, err)
    assert "Traceback" not in err and not list((tmp_path / "runs").rglob("*.pt"))


def test_string_image_ids_are_refused_before_training(shared_datasets, tmp_path, cli_main, capsys):
    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root, 2)
    records[0]["id"] = "img1"
    anns = [box(1, "img1", [10, 10, 100, 100]), box(2, 2, [10, 10, 100, 100])]
    train_json = write_coco(root / "train.json", records, anns)
    with pytest.raises(DatasetError, match="image id 'img1': the id is not an integer"):
        load_coco(train_json)
    config = tiny_yaml(tmp_path / "bad.yaml", train_json, tmp_path / "runs")
    assert cli_main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "[bad_image_id] image id 'img1' (raccoon-1.jpg)" in err, err
    assert "--fix renumbers" in err


def test_val_set_without_area_is_filled_from_the_box(shared_datasets, tmp_path, caplog):
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root, 2)
    anns = [box(1, 1, [10, 10, 100, 50]), box(2, 2, [20, 30, 40, 60])]
    for a in anns:
        del a["area"]
    with caplog.at_level(logging.INFO, logger="detector"):
        cset = load_coco(write_coco(root / "val.json", records, anns))
    assert [a["area"] for a in cset.coco.dataset["annotations"]] == [5000.0, 2400.0]
    assert any("no usable 'area'" in r.getMessage() for r in caplog.records)
    detections = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in anns
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(cset.coco, cset.coco.loadRes(detections), "bbox")
        evaluator.evaluate()  # KeyError 'area' without the fill
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("role", "anns", "expected"),
    [
        ("train", [], "[no_usable_boxes]"),
        ("train", [box(1, 1, [700, 10, 20, 20]), box(2, 2, [0, 0, 0, 5])], "[no_usable_boxes]"),
        ("val", [], "[val_without_boxes] the val set has no usable box"),
        ("val", [box(1, 1, [10, 10, 50, 50], iscrowd=1)], "only 1 iscrowd boxes"),
    ],
)
def test_sets_with_nothing_to_learn_or_measure_stop_at_preflight(
    shared_datasets, tmp_path, role, anns, expected
):
    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root, 2)
    good = write_coco(root / "good.json", records, [box(1, 1, [10, 10, 100, 100])])
    bad = write_coco(root / f"{role}.json", records, anns)
    train, val = (bad, good) if role == "train" else (good, bad)
    with pytest.raises(DatasetError) as err:
        preflight(load_coco(train), load_coco(val), progress=False)
    assert expected in str(err.value) and str(bad) in str(err.value)


def test_images_that_lost_every_box_are_named(shared_datasets, tmp_path, caplog):
    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root, 2)
    anns = [box(1, 1, [10, 10, 100, 100]), box(2, 2, [5000, 10, 30, 30])]  # outside raccoon-2
    cset = load_coco(write_coco(root / "train.json", records, anns))
    with caplog.at_level(logging.INFO, logger="detector"):
        preflight(cset, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 images lost every box" in w and "raccoon-2.jpg" in w for w in warnings)


def test_truncated_jpeg_that_opencv_decodes_is_named_everywhere(shared_datasets, tmp_path):
    root = tmp_path / "set"
    records = raccoon_set(shared_datasets, root, 2)
    cut = root / "images" / "raccoon-2.jpg"
    cut.write_bytes(cut.read_bytes()[:-600])
    assert cv2.imread(str(cut)) is not None  # OpenCV fills the missing rows grey, no error
    cset = load_coco(write_coco(root / "train.json", records, [box(1, 1, [10, 10, 100, 100])]))
    with pytest.raises(ImageReadError, match=r"raccoon-2\.jpg.*truncated"):  # preflight=false
        DetectionDataset(cset)[1]
    with pytest.raises(DatasetError) as err:
        preflight(cset, progress=False)
    assert "raccoon-2.jpg" in str(err.value) and "truncated" in str(err.value)
