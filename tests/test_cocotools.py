"""COCO dataset tools (detector/cocotools, tools/*.py): real exports and small broken sets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from detector.cocotools.common import CocoError, roboflow_stem, source_key
from detector.cocotools.merge import MergeSource, merge_coco, write_merged
from detector.cocotools.show import show_coco
from detector.cocotools.split import GroupBy, parse_gap, split_coco, split_file
from detector.cocotools.stats import coco_stats
from detector.cocotools.validate import Problem, ValidationReport, fix_coco, validate_coco

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def coco128(shared_datasets: Path) -> tuple[Path, Path]:
    root = shared_datasets / "coco128"
    return root / "annotations" / "instances_train2017.json", root / "images" / "train2017"


@pytest.fixture(scope="module")
def rabbit(shared_datasets: Path) -> tuple[Path, Path]:
    root = shared_datasets / "rabbit-roboflow-labelstudio" / "train"
    return root / "_annotations.coco.json", root


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_set(
    root: Path, n: int = 4, categories: tuple[str, ...] = ("cat", "dog"), seed: int = 0
) -> tuple[Path, dict[str, Any]]:
    """DIR/annotations.json + DIR/images/img<i>.jpg (64x48), one 'cat' box and one of class
    i % len(categories) per image; nothing wrong with it."""
    images, annotations = [], []
    for i in range(n):
        write_image(root / "images" / f"img{i}.jpg", seed=seed * 1000 + i)
        images.append({"id": i + 1, "file_name": f"img{i}.jpg", "width": 64, "height": 48})
        for k, cid in enumerate((1, 1 + i % len(categories))):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cid,
                    "bbox": [4 + 20 * k, 4, 16, 12],
                    "area": 192.0,
                    "iscrowd": 0,
                }
            )
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)],
    }
    return save(root / "annotations.json", data), data


def save(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def kinds(problems: list[Problem]) -> Counter[str]:
    return Counter(p.kind for p in problems)


def only(problems: list[Problem], kind: str) -> Problem:
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, f"expected one {kind}, got {[p.message for p in problems]}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# validate on the real exports


def test_validate_coco128_is_clean_but_for_unused_classes(coco128):
    ann, images = coco128
    report = validate_coco(ann, images, progress=False)
    assert report.ok and report.errors == []
    # 9 of the 80 COCO classes have no box among the first 128 images
    assert kinds(report.warnings) == {"empty_category": 9}
    assert any("'hair drier'" in p.message for p in report.warnings)
    negatives = sorted(p.file_name for p in report.infos if p.kind == "negative")
    assert negatives == ["000000000250.jpg", "000000000508.jpg"]
    assert "10 iscrowd boxes" in only(report.infos, "crowd_boxes").message
    assert (report.num_images, report.images_found, report.num_annotations) == (128, 128, 939)
    # without --images the default folder (annotations/) is wrong: said first, then the 128 files
    wrong = validate_coco(ann, progress=False)
    assert wrong.errors[0].kind == "wrong_image_dir" and "--images" in wrong.errors[0].message
    assert kinds(wrong.errors) == {"wrong_image_dir": 1, "missing_image": 128}


def test_validate_rabbit_reports_203_missing_images(rabbit):
    ann, folder = rabbit
    report = validate_coco(ann, progress=False)  # default image folder: the JSON's own folder
    assert report.images_dir == folder.resolve()
    assert not report.ok
    assert kinds(report.errors) == {"missing_image": 203}
    data = json.loads(ann.read_text())
    missing = {r["file_name"] for r in data["images"] if not (folder / r["file_name"]).is_file()}
    assert {p.file_name for p in report.errors} == missing and len(missing) == 203
    by_name = {r["file_name"]: r["id"] for r in data["images"]}
    assert all(by_name[p.file_name] == p.image_id for p in report.errors)
    # the placeholder category is flagged; the .gitkeep and Label Studio JSON are not images
    warning = only(report.warnings, "empty_category")
    assert "'z'" in warning.message and "placeholder" in warning.message
    assert report.images_found == 197


def test_validate_fix_rabbit_validates_clean(rabbit, tmp_path):
    ann, folder = rabbit
    report = validate_coco(ann, progress=False)
    fixed = fix_coco(report)
    assert fixed.dropped_images == 203 and len(fixed.data["images"]) == 197
    assert [c["name"] for c in fixed.data["categories"]] == ["rabbit"]
    assert len(fixed.data["annotations"]) == 260
    out = save(tmp_path / "fixed.json", fixed.data)
    again = validate_coco(out, folder, progress=False)
    assert again.ok and again.warnings == [], again.format()


# ---------------------------------------------------------------------------------------------
# validate: one small broken set per kind of problem


def test_validate_synthetic_clean_set(tmp_path):
    ann, _ = make_set(tmp_path)
    report = validate_coco(ann, progress=False)
    assert report.ok and report.warnings == [] and report.infos == []
    assert report.images_dir == (tmp_path / "images").resolve()


def test_malformed_json_and_missing_keys(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    report = validate_coco(bad, progress=False)
    assert only(report.errors, "json_invalid").message.count("line 1") == 1
    no_cats = save(tmp_path / "nocats.json", {"images": [], "annotations": []})
    report = validate_coco(no_cats, progress=False)
    assert "'categories'" in only(report.errors, "missing_key").message
    assert not validate_coco(tmp_path / "nope.json", progress=False).ok


def test_missing_unreadable_and_unlisted_images(tmp_path):
    ann, _ = make_set(tmp_path)
    (tmp_path / "images" / "img1.jpg").unlink()
    (tmp_path / "images" / "img2.jpg").write_bytes(b"this is not a jpeg")
    write_image(tmp_path / "images" / "extra.jpg")
    (tmp_path / "images" / ".hidden.jpg").write_bytes(b"x")
    report = validate_coco(ann, progress=False)
    missing = only(report.errors, "missing_image")
    assert (missing.image_id, missing.file_name) == (2, "img1.jpg")
    unreadable = only(report.errors, "unreadable_image")
    assert (unreadable.image_id, unreadable.file_name) == (3, "img2.jpg")
    assert only(report.warnings, "unlisted_image").file_name == "extra.jpg"


def test_truncated_jpeg_caught_by_decode(tmp_path):
    ann, _ = make_set(tmp_path, n=2)
    path = tmp_path / "images" / "img0.jpg"
    write_image(path, 64, 48, seed=7)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    header = validate_coco(ann, progress=False)
    assert header.ok  # the header is intact ...
    assert only(header.warnings, "maybe_truncated").image_id == 1  # ... but the end marker is not
    decoded = validate_coco(ann, decode=True, progress=False)
    problem = only(decoded.errors, "unreadable_image")
    assert problem.image_id == 1 and "truncated" in problem.message.lower()


def test_size_mismatch_and_exif_raw_size(tmp_path):
    ann, data = make_set(tmp_path, n=3)
    data["images"][0]["width"] = 100
    # img1: EXIF orientation 6 (rotate 90): stored 64x48, displayed 48x64
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "images" / "img1.jpg", exif=exif)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    # img2 rotated too, but its record has the displayed size: fine (an info)
    Image.new("RGB", (64, 48), (30, 30, 200)).save(tmp_path / "images" / "img2.jpg", exif=exif)
    data["images"][2].update(width=48, height=64)
    save(ann, data)
    report = validate_coco(ann, progress=False)
    mismatches = {p.image_id: p.message for p in report.errors if p.kind == "size_mismatch"}
    assert set(mismatches) == {1, 2}
    assert "100x48" in mismatches[1] and "64x48" in mismatches[1]
    assert "raw, un-rotated" in mismatches[2] and "48x64" in mismatches[2]
    assert only(report.infos, "exif_orientation").image_id == 3


def test_bad_boxes(tmp_path):
    ann, data = make_set(tmp_path, n=4)
    boxes = {
        1: [100, 100, 5, 5],  # entirely outside the 64x48 image
        2: [50, 40, 30, 20],  # runs past the right and bottom edges
        3: [4, 4, 0, 10],  # zero width
        4: [4, 4, 10, -3],  # negative height
        5: [float("nan"), 4, 10, 10],  # NaN (json writes NaN, json reads it back)
        6: [1, 2, 3],
    }  # not four numbers
    for ann_rec in data["annotations"]:
        ann_rec["bbox"] = boxes.get(ann_rec["id"], ann_rec["bbox"])
    save(ann, data)
    report = validate_coco(ann, progress=False)
    assert [(p.kind, p.ann_id) for p in report.errors] == [
        ("box_outside", 1),
        ("box_empty", 3),
        ("box_empty", 4),
        ("box_nan", 5),
        ("bad_bbox", 6),
    ]
    past = only(report.warnings, "box_past_edge")
    assert (past.ann_id, past.image_id, past.file_name) == (2, 1, "img0.jpg")


def test_boxes_stored_as_xyxy_are_recognised(tmp_path):
    ann, data = make_set(tmp_path, n=4)
    for a in data["annotations"]:  # boxes in the lower right, written as [x1, y1, x2, y2]
        a["bbox"] = [30, 20, 60, 45]
    save(ann, data)
    report = validate_coco(ann, progress=False)
    warning = only(report.warnings, "bbox_looks_xyxy")
    assert warning.message.startswith("8 of 8 boxes run past the image edge")
    fixed = fix_coco(report, xyxy=True)
    assert all(a["bbox"] == [30, 20, 30, 25] for a in fixed.data["annotations"])
    # genuine xywh boxes near the top-left corner do not trigger it (coco128 neither)
    ann2, _ = make_set(tmp_path / "ok", n=4)
    assert "bbox_looks_xyxy" not in kinds(validate_coco(ann2, progress=False).warnings)


def test_unknown_ids_duplicates_and_empty_classes(tmp_path):
    ann, data = make_set(tmp_path, n=3, categories=("cat", "dog", "bird"))
    data["annotations"][0]["category_id"] = 99
    data["annotations"][1]["image_id"] = 77
    data["annotations"][3]["id"] = data["annotations"][2]["id"]
    data["images"][2]["id"] = 2  # img2.jpg and img1.jpg both claim id 2
    data["categories"].append({"id": 3, "name": "horse"})
    data["categories"].append({"id": 4, "name": " Cat "})
    save(ann, data)
    report = validate_coco(ann, progress=False)
    assert only(report.errors, "unknown_category").ann_id == 1
    # 77 does not exist, and image 3 was renamed 2 above, so its boxes (5, 6) lost their image
    assert [p.ann_id for p in report.errors if p.kind == "unknown_image_id"] == [2, 5, 6]
    assert only(report.errors, "duplicate_ann_id").ann_id == 3
    dup_image = only(report.errors, "duplicate_image_id")
    assert (dup_image.image_id, dup_image.file_name) == (2, "img2.jpg")
    assert "'bird'" in only(report.errors, "duplicate_category_id").message
    assert "' Cat '" in only(report.errors, "duplicate_category_name").message
    # 'bird' boxes were on image 3 (now unknown); the extra ' Cat ' never had any
    empty = [p.message for p in report.warnings if p.kind == "empty_category"]
    assert len(empty) == 2 and "'bird'" in empty[0] and "' Cat '" in empty[1]


def test_escaping_file_names_are_refused(tmp_path):
    ann, data = make_set(tmp_path / "set", n=3)
    write_image(tmp_path / "outside.jpg")  # exists, but outside the image folder
    data["images"][0]["file_name"] = "../../outside.jpg"
    data["images"][1]["file_name"] = str(tmp_path / "outside.jpg")
    save(ann, data)
    report = validate_coco(ann, progress=False)
    unsafe = [p for p in report.errors if p.kind == "unsafe_path"]
    assert [p.image_id for p in unsafe] == [1, 2]
    assert "escapes" in unsafe[0].message and "absolute" in unsafe[1].message
    assert "missing_image" not in kinds(report.errors)  # never looked at
    fixed = fix_coco(report)
    assert [r["file_name"] for r in fixed.data["images"]] == ["img2.jpg"]


def test_negatives_and_missing_area(tmp_path):
    ann, data = make_set(tmp_path, n=3)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    del data["annotations"][0]["area"]
    save(ann, data)
    report = validate_coco(ann, progress=False)
    assert report.ok
    negative = only(report.infos, "negative")
    assert (negative.image_id, negative.file_name) == (2, "img1.jpg")
    assert only(report.warnings, "missing_area").ann_id == 1


def test_fix_repairs_everything_and_lists_changes(tmp_path):
    ann, data = make_set(tmp_path, n=6, categories=("cat", "dog"))
    (tmp_path / "images" / "img5.jpg").unlink()  # image 6 missing
    data["images"][0]["width"] = 640  # wrong size
    data["images"][1]["id"] = 1  # duplicate image id, other file
    data["images"].append(dict(data["images"][2]))  # the same record twice
    data["categories"].append({"id": 7, "name": "DOG"})  # same name as 'dog'
    data["categories"].append({"id": 0, "name": "animals", "supercategory": "none"})
    for c in data["categories"]:
        if c["id"] != 0:
            c["supercategory"] = "animals"  # id 0: Roboflow-style placeholder
    a = data["annotations"]
    a[0]["bbox"] = [50, 40, 30, 20]  # clip
    a[1]["bbox"] = [100, 100, 4, 4]  # outside: drop
    a[4]["bbox"] = [4, 4, 0, 4]  # empty: drop
    a[5]["bbox"] = [float("nan"), 1, 2, 3]  # NaN: drop
    a[6]["category_id"] = 42  # unknown: drop
    a[7]["category_id"] = 7  # 'DOG' -> merged into 'dog'
    a[8]["id"] = a[9]["id"]  # duplicate ann id: renumber
    del a[9]["area"]
    save(ann, data)
    validate = load_tool("validate")
    out = tmp_path / "fixed.json"
    report_json = tmp_path / "report.json"
    assert (
        validate.main([str(ann), "--fix", str(out), "--json", str(report_json), "--no-progress"])
        == 1
    )
    fixed = json.loads(out.read_text())
    again = validate_coco(out, tmp_path / "images", progress=False)
    assert again.ok and again.warnings == [], again.format()
    changes = json.loads(report_json.read_text())["fix"]["changes"]
    text = "\n".join(changes)
    for expected in (
        "dropped image id 6 (img5.jpg): file not found",
        "width x height 640 x 48 -> 64 x 48",
        "renumbered to 7",
        "dropped repeated record of image id 3",
        "merged category 7 'DOG' into 2 'dog' (1 boxes moved)",
        "dropped category 0 'animals': Roboflow's placeholder",
        "clipped to [50, 40, 14, 8]",
        "entirely outside",
        "zero or negative width/height",
        "NaN/infinite",
        "unknown category_id 42",
        "area set to 192",
    ):
        assert expected in text, expected
    assert {c["name"] for c in fixed["categories"]} == {"cat", "dog"}
    assert len({a["id"] for a in fixed["annotations"]}) == len(fixed["annotations"])
    assert json.loads(ann.read_text()) == json.loads(json.dumps(data))  # input untouched


def test_validate_cli_exit_codes_and_refusals(tmp_path, coco128):
    validate = load_tool("validate")
    ann, images = coco128
    assert validate.main([str(ann), "--images", str(images), "--no-progress"]) == 0
    mine, _ = make_set(tmp_path)
    before = mine.read_bytes()
    assert validate.main([str(mine), "--fix", str(mine), "--no-progress"]) == 2
    assert validate.main([str(mine), "--json", str(mine), "--no-progress"]) == 2
    assert mine.read_bytes() == before
    (tmp_path / "images" / "img0.jpg").unlink()
    assert validate.main([str(mine), "--no-progress"]) == 1


def test_validate_script_runs_standalone(tmp_path):
    ann, _ = make_set(tmp_path)
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "validate.py"), str(ann)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "summary: 0 errors, 0 warnings, 0 infos: OK" in run.stdout


def test_validate_does_not_import_torch():
    code = (
        "import sys, detector.cocotools.validate, detector.cocotools.split; "
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


def test_report_dataclasses_api():
    report = ValidationReport()
    assert report.ok and report.errors == [] and report.warnings == [] and report.infos == []
    report.errors.append(Problem("missing_image", "gone", image_id=3, file_name="a.jpg"))
    assert not report.ok and report.to_dict()["errors"][0]["image_id"] == 3


# ---------------------------------------------------------------------------------------------
# split


def group_of(file_name: str) -> str:
    return source_key(file_name)


def test_roboflow_names():
    assert (
        roboflow_stem("0a5b1f2391bcbbb5_jpg.rf.87b4245f28d2c6626f7536372f1e2277.jpg")
        == "0a5b1f2391bcbbb5"
    )
    assert roboflow_stem("IMG_001_png.rf.abc123.png") == "IMG_001"
    assert roboflow_stem("plain.jpg") is None
    assert source_key("sub/a_jpg.rf.1.jpg") == source_key("sub/a_jpg.rf.2.jpg") == "sub/a"


def test_split_rabbit_deterministic_and_proportional(rabbit, tmp_path):
    ann, _ = rabbit
    first = split_file(ann, 0.2, 0.1, seed=0, out_dir=tmp_path / "a", progress=False)
    second = split_file(ann, 0.2, 0.1, seed=0, out_dir=tmp_path / "b", progress=False)
    other = split_file(ann, 0.2, 0.1, seed=1, out_dir=tmp_path / "c", progress=False)
    assert second.splits == first.splits
    for side in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{side}.json").read_bytes() == (
            tmp_path / "b" / f"{side}.json"
        ).read_bytes()
    names = {s: [r["file_name"] for r in p["images"]] for s, p in first.splits.items()}
    assert names["val"] != [r["file_name"] for r in other.splits["val"]["images"]]
    assert [len(v) for v in names.values()] == [280, 80, 40]
    assert sum(len(p["annotations"]) for p in first.splits.values()) == 566
    assert first.missing_images == 203


def test_split_keeps_roboflow_copies_together(rabbit, tmp_path):
    ann, folder = rabbit
    data = json.loads(ann.read_text())
    next_image, next_ann = 1000, 5000
    boxes = defaultdict(list)
    for a in data["annotations"]:
        boxes[a["image_id"]].append(a)
    for rec in list(data["images"][:120]):  # two more augmented copies of 120 photos
        stem = roboflow_stem(rec["file_name"])
        for k in range(2):
            copy = {**rec, "id": next_image, "file_name": f"{stem}_jpg.rf.{k}{next_image:x}.jpg"}
            data["images"].append(copy)
            for a in boxes[rec["id"]]:
                data["annotations"].append({**a, "id": next_ann, "image_id": next_image})
                next_ann += 1
            next_image += 1
    src = save(tmp_path / "augmented.json", data)
    for seed in range(3):
        result = split_file(
            src,
            0.25,
            0.1,
            seed=seed,
            out_dir=tmp_path / f"s{seed}",
            images_dir=folder,
            progress=False,
        )
        assert result.multi_image_groups == 120
        side_of: dict[str, set[str]] = defaultdict(set)
        for side, part in result.splits.items():
            for rec in part["images"]:
                side_of[group_of(rec["file_name"])].add(side)
        assert all(len(sides) == 1 for sides in side_of.values())
        assert len(side_of) == 400
        sizes = {s: len(p["images"]) for s, p in result.splits.items()}
        assert abs(sizes["val"] / 640 - 0.25) < 0.03 and abs(sizes["test"] / 640 - 0.1) < 0.03


def test_split_keeps_identical_files_together(tmp_path):
    ann, data = make_set(tmp_path, n=20)
    for i in range(6):  # byte-identical twins under unrelated names
        twin = tmp_path / "images" / f"twin{i}.jpg"
        twin.write_bytes((tmp_path / "images" / f"img{i}.jpg").read_bytes())
        data["images"].append({"id": 100 + i, "file_name": twin.name, "width": 64, "height": 48})
    save(ann, data)
    for seed in range(4):
        result = split_file(ann, 0.5, seed=seed, out_dir=tmp_path / f"o{seed}", progress=False)
        side = {r["file_name"]: s for s, p in result.splits.items() for r in p["images"]}
        assert all(side[f"img{i}.jpg"] == side[f"twin{i}.jpg"] for i in range(6))
        assert result.multi_image_groups == 6
    no_hash = split_coco(data, 0.5, image_dir=None)
    assert no_hash.multi_image_groups == 0


def test_split_is_stratified_by_class():
    # class 1 in 300 images, class 2 in 100 (60 of them with class 1), class 3 in 20, 80 negatives
    images, annotations = [], []

    def add(classes: list[int]) -> None:
        image_id = len(images) + 1
        images.append(
            {"id": image_id, "file_name": f"p{image_id}.jpg", "width": 100, "height": 100}
        )
        for c in classes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": [1, 1, 5, 5],
                }
            )

    for i in range(300):
        add([1, 2] if i < 60 else [1])
    for _ in range(40):
        add([2])
    for _ in range(20):
        add([3, 3])
    for _ in range(80):
        add([])
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
    }
    for seed in range(3):
        result = split_coco(data, 0.2, 0.1, seed=seed)
        for cid, total in ((1, 300), (2, 100), (3, 20)):
            for side, share in (("val", 0.2), ("test", 0.1)):
                part = result.splits[side]
                count = len({a["image_id"] for a in part["annotations"] if a["category_id"] == cid})
                assert abs(count / total - share) <= 0.05 + 1 / total, (seed, cid, side, count)
        negatives = {
            s: sum(1 for r in p["images"] if r["id"] > 360) for s, p in result.splits.items()
        }
        assert all(abs(negatives[s] - n) <= 1 for s, n in (("train", 56), ("val", 16), ("test", 8)))
        ids = [r["id"] for p in result.splits.values() for r in p["images"]]
        assert sorted(ids) == list(range(1, 441))


def test_split_cli_writes_beside_input_and_refuses_overwrite(tmp_path, capsys):
    split = load_tool("split")
    ann, _ = make_set(tmp_path, n=10)
    assert split.main([str(ann), "--val", "0.3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "note:" not in out  # same folder: same images/ folder
    parts = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in ("train", "val")}
    assert len(parts["train"]["images"]) + len(parts["val"]["images"]) == 10
    assert not (tmp_path / "test.json").exists()
    train = tmp_path / "train.json"
    before = train.read_bytes()
    assert split.main([str(train), "--val", "0.3", "--no-progress"]) == 2  # would overwrite it
    assert train.read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err
    # the splits, sharing the image folder, do not report each other's images as unlisted
    report = validate_coco(tmp_path / "val.json", progress=False)
    assert report.ok and report.warnings == [] and kinds(report.infos) == {"listed_by_sibling": 1}
    with pytest.raises(CocoError):
        split_file(ann, 0.6, 0.5)


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_coco128_and_rabbit(coco128, rabbit, tmp_path):
    (c_ann, c_images), (r_ann, r_folder) = coco128, rabbit
    merge = load_tool("merge")
    out = tmp_path / "merged" / "merged.json"
    assert (
        merge.main(
            [
                str(c_ann),
                str(r_ann),
                "--images",
                str(c_images),
                "-",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    merged = json.loads(out.read_text())
    cats = {c["id"]: c["name"] for c in merged["categories"]}
    assert len(cats) == 81 and cats[81] == "rabbit" and "z" not in cats.values()
    assert len(set(cats.values())) == 81

    def names_by_source(path: Path, folder: Path) -> Counter[str]:
        data = json.loads(path.read_text())
        present = {r["id"] for r in data["images"] if (folder / r["file_name"]).is_file()}
        cat_name = {c["id"]: c["name"] for c in data["categories"]}
        return Counter(
            cat_name[a["category_id"]] for a in data["annotations"] if a["image_id"] in present
        )

    prefix_of = {r["id"]: r["file_name"].split("/")[0] for r in merged["images"]}
    got: dict[str, Counter[str]] = defaultdict(Counter)
    for a in merged["annotations"]:
        got[prefix_of[a["image_id"]]][cats[a["category_id"]]] += 1
    assert got["coco128"] == names_by_source(c_ann, c_images)
    assert got["rabbit-roboflow-labelstudio"] == names_by_source(r_ann, r_folder)
    assert sum(got["rabbit-roboflow-labelstudio"].values()) == 260
    assert Counter(prefix_of.values()) == {"coco128": 128, "rabbit-roboflow-labelstudio": 197}
    assert len({a["id"] for a in merged["annotations"]}) == 939 + 260
    first = merged["images"][0]
    assert os.path.samefile(
        out.parent / "images" / first["file_name"], c_images / first["file_name"].split("/", 1)[1]
    )
    report = validate_coco(out, progress=False)  # self-contained: images/ beside it
    assert report.ok and report.images_found == 325
    # a second run needs --overwrite, then finds the same files there; --out onto an input
    # is refused
    again = [str(c_ann), str(r_ann), "--images", str(c_images), "-", "--out", str(out)]
    assert merge.main([*again, "--no-progress"]) == 2
    assert merge.main([*again, "--no-progress", "--overwrite"]) == 0
    assert (
        merge.main(
            [
                str(c_ann),
                str(out),
                "--images",
                str(c_images),
                "-",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )


def test_merge_matches_names_case_and_space_insensitively(tmp_path):
    a_ann, _ = make_set(tmp_path / "farm", n=2, categories=("Car", "truck"), seed=1)
    b_ann, b_data = make_set(tmp_path / "city", n=3, categories=("  car ", "Bus"), seed=2)
    result = merge_coco([MergeSource(a_ann), MergeSource(b_ann)])
    assert [(c["id"], c["name"]) for c in result.data["categories"]] == [
        (1, "Car"),
        (2, "truck"),
        (3, "Bus"),
    ]
    assert result.category_maps == {"farm": {1: 1, 2: 2}, "city": {1: 1, 2: 3}}
    names = [r["file_name"] for r in result.data["images"]]
    assert names == [
        "farm/img0.jpg",
        "farm/img1.jpg",
        "city/img0.jpg",
        "city/img1.jpg",
        "city/img2.jpg",
    ]  # same file names, kept apart by source folder
    b_cats = [a["category_id"] for a in b_data["annotations"]]
    merged_b = [a["category_id"] for a in result.data["annotations"][4:]]
    assert merged_b == [{1: 1, 2: 3}[c] for c in b_cats]
    stats = write_merged(
        result,
        tmp_path / "out" / "all.json",
        copy=True,
        inputs=[MergeSource(a_ann), MergeSource(b_ann)],
        progress=False,
    )
    assert stats.copied == 5
    assert validate_coco(tmp_path / "out" / "all.json", progress=False).ok
    with pytest.raises(CocoError, match="image folder"):
        write_merged(
            result,
            tmp_path / "x.json",
            images_out=tmp_path / "farm" / "images" / "m",
            inputs=[MergeSource(a_ann)],
            progress=False,
        )


# ---------------------------------------------------------------------------------------------
# stats and show


def test_stats_match_independent_counts(coco128, tmp_path):
    ann, images = coco128
    data = json.loads(ann.read_text())
    stats = coco_stats(data, images)
    boxes = Counter(a["category_id"] for a in data["annotations"])
    image_sets: dict[int, set[int]] = defaultdict(set)
    for a in data["annotations"]:
        image_sets[a["category_id"]].add(a["image_id"])
    for c in stats.classes:
        assert c.boxes == boxes[c.id] and c.images == len(image_sets[c.id])
        assert c.small + c.medium + c.large == boxes[c.id]
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in data["annotations"]])
    assert stats.size_buckets == {
        "small": int((areas < 1024).sum()),
        "medium": int(((areas >= 1024) & (areas < 9216)).sum()),
        "large": int((areas >= 9216).sum()),
    }
    assert sum(n for _, _, n in stats.side_histogram) == 939
    assert stats.negatives == 128 - len({a["image_id"] for a in data["annotations"]}) == 2
    assert stats.crowd == sum(a["iscrowd"] for a in data["annotations"]) == 10
    assert stats.image_sizes[(640, 480)] == sum(
        1 for r in data["images"] if (r["width"], r["height"]) == (640, 480)
    )
    assert stats.images_on_disk == 128
    tool = load_tool("stats")
    plot, numbers = tmp_path / "stats.png", tmp_path / "stats.json"
    assert (
        tool.main([str(ann), "--images", str(images), "--plot", str(plot), "--json", str(numbers)])
        == 0
    )
    picture = cv2.imread(str(plot))
    assert picture is not None and picture.shape[0] > 300
    assert json.loads(numbers.read_text())["annotations"] == 939
    assert tool.main([str(ann), "--plot", str(ann)]) == 2


def test_show_writes_decodable_pngs(tmp_path, capsys):
    ann, data = make_set(tmp_path / "set", n=5)
    data["annotations"][0]["bbox"] = [10, 10, 30, 20]
    data["annotations"][0]["iscrowd"] = 1
    save(ann, data)
    (tmp_path / "set" / "images" / "img4.jpg").unlink()  # skipped, another one is drawn
    result = show_coco(ann, tmp_path / "out", n=3, seed=0, progress=False)
    assert len(result.written) == 3 and len(set(result.written)) == 3
    for png in result.written:
        picture = cv2.imread(str(png))
        assert picture is not None and picture.shape[1] == 64 and picture.shape[0] > 48
    tool = load_tool("show")
    assert tool.main([str(ann), "--out", str(tmp_path / "all"), "-n", "10", "--no-progress"]) == 0
    assert "wrote 4 PNGs" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "1_img0.png",
        "2_img1.png",
        "3_img2.png",
        "4_img3.png",
    ]
    # the box of image 1 is drawn in its class colour (its bottom edge; the caption is above)
    drawn = cv2.imread(str(tmp_path / "all" / "1_img0.png"))
    offset = drawn.shape[0] - 48
    from detector.cocotools.show import class_color

    assert tuple(int(v) for v in drawn[offset + 30, 25]) == class_color(1)
    assert tool.main([str(ann), "--out", str(tmp_path / "set" / "images")]) == 2
    assert tool.main([str(ann), "--out", str(tmp_path / "ids"), "--ids", "2", "3"]) == 0
    assert len(list((tmp_path / "ids").iterdir())) == 2


def test_show_coco128(coco128, tmp_path):
    ann, images = coco128
    result = show_coco(ann, tmp_path, n=2, seed=3, images_dir=images, progress=False)
    assert len(result.written) == 2
    assert all(cv2.imread(str(p)) is not None for p in result.written)
    assert result.skipped == []


def test_symlinked_images_are_accepted(tmp_path):
    """tools/convert.py --link output: images/ holds symlinks to the export. Paths are checked
    lexically (no ``..``, not absolute), so links the user placed are followed by every tool."""
    _, data = make_set(tmp_path / "export", n=3)
    linked = tmp_path / "converted"
    (linked / "images").mkdir(parents=True)
    for rec in data["images"]:
        os.symlink(
            tmp_path / "export" / "images" / rec["file_name"], linked / "images" / rec["file_name"]
        )
    ann = save(linked / "annotations.json", data)
    report = validate_coco(ann, progress=False)
    assert report.errors == [] and report.warnings == []
    assert len(fix_coco(report).data["images"]) == 3
    assert coco_stats(data, linked / "images").images_on_disk == 3
    assert split_file(ann, 0.34, out_dir=tmp_path / "split", progress=False).missing_images == 0
    assert len(show_coco(ann, tmp_path / "show", n=3, progress=False).written) == 3
    with pytest.raises(CocoError, match="already exists; pass --overwrite"):  # a second run
        show_coco(ann, tmp_path / "show", n=3, progress=False)
    assert len(show_coco(ann, tmp_path / "show", n=3, progress=False, overwrite=True).written) == 3
    merged = merge_coco([MergeSource(ann)])
    stats = write_merged(
        merged, tmp_path / "m" / "merged.json", inputs=[MergeSource(ann)], progress=False
    )
    assert stats.linked == 3 and validate_coco(tmp_path / "m" / "merged.json", progress=False).ok


# ---------------------------------------------------------------------------------------------
# split --group-by: frames of one sequence on one side


def sequence_set(videos: int = 6, frames: int = 5) -> dict[str, Any]:
    images, anns = [], []
    for v in range(videos):
        for f in range(frames):
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"cam{v % 2}/vid{v}_frame{f:03d}.jpg",
                    "width": 64,
                    "height": 48,
                    "video_id": f"v{v}",
                }
            )
            anns.append(
                {
                    "id": image_id,
                    "image_id": image_id,
                    "category_id": 1 + v % 2,
                    "bbox": [1, 1, 10, 10],
                    "area": 100,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "deer"}, {"id": 2, "name": "boar"}]
    return {"images": images, "annotations": anns, "categories": categories}


def sides_of_groups(result, group_of_name) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = defaultdict(set)
    for side, part in result.splits.items():
        for rec in part["images"]:
            sides[group_of_name(rec)].add(side)
    return sides


def video_of(rec: dict[str, Any]) -> str:
    return rec["file_name"].split("/")[1].split("_")[0]


@pytest.mark.parametrize(
    "group_by",
    [
        GroupBy("name", pattern=r"(vid\d+)_frame"),
        GroupBy("field", field="video_id"),
    ],
    ids=["name", "field"],
)
def test_split_group_by_keeps_every_sequence_on_one_side(group_by):
    data = sequence_set()
    for seed in range(5):
        result = split_coco(data, 0.3, seed=seed, group_by=group_by)
        sides = sides_of_groups(result, video_of)
        assert all(len(s) == 1 for s in sides.values()), (seed, dict(sides))
        assert result.num_groups == 6 and result.ungrouped_images == 0
        assert result.splits["val"]["images"] and result.splits["train"]["images"]
    # Without it, frames of one video land on both sides (what the option prevents).
    plain = [sides_of_groups(split_coco(data, 0.3, seed=s), video_of) for s in range(5)]
    assert any(len(s) > 1 for sides in plain for s in sides.values())


def test_split_group_by_name_counts_files_the_pattern_misses():
    data = sequence_set(videos=4, frames=3)
    data["images"][0]["file_name"] = "loose.jpg"
    result = split_coco(data, 0.3, group_by=GroupBy("name", pattern=r"(vid\d+)_frame"))
    assert result.ungrouped_images == 1
    with pytest.raises(CocoError, match="not a regular expression"):
        split_coco(data, 0.3, group_by=GroupBy("name", pattern="(unclosed"))
    with pytest.raises(CocoError, match="needs --pattern"):
        split_coco(data, 0.3, group_by=GroupBy("name"))


def write_exif_jpeg(path: Path, taken: str, seed: int, model: str = "TrailCam X") -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "Acme"
    exif[0x0110] = model
    exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif)


def test_split_group_by_exif_time_gaps(tmp_path):
    # 4 bursts of 4 frames, 2 s apart inside a burst, 10 minutes between bursts.
    images, anns = [], []
    for burst in range(4):
        for frame in range(4):
            image_id = len(images) + 1
            name = f"img{image_id:03d}.jpg"
            taken = f"2026:11:30 21:{10 * burst + 10:02d}:{2 * frame:02d}"
            write_exif_jpeg(tmp_path / "images" / name, taken, seed=image_id)
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 48})
            anns.append(
                {
                    "id": image_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [1, 1, 10, 10],
                    "area": 100,
                    "iscrowd": 0,
                }
            )
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "deer"}]}

    def burst_of(rec: dict[str, Any]) -> str:
        return str((rec["id"] - 1) // 4)

    for seed in range(4):
        result = split_coco(
            data, 0.25, seed=seed, image_dir=tmp_path / "images", group_by=GroupBy("exif-time")
        )
        assert result.num_groups == 4 and result.ungrouped_images == 0
        assert all(len(s) == 1 for s in sides_of_groups(result, burst_of).values())
    # A 1 s gap separates every frame.
    tight = split_coco(
        data, 0.25, image_dir=tmp_path / "images", group_by=GroupBy("exif-time", gap_seconds=1)
    )
    assert tight.num_groups == 16


def test_split_cli_group_by(tmp_path, capsys):
    src = tmp_path / "set.json"
    src.write_text(json.dumps(sequence_set()))
    tool = load_tool("split")
    argv = [str(src), "--val", "0.3", "--no-hash", "--no-progress", "--group-by", "name"]
    assert tool.main([*argv, "--pattern", r"(vid\d+)_frame"]) == 0
    val = json.loads((tmp_path / "val.json").read_text())
    train = json.loads((tmp_path / "train.json").read_text())
    assert not {video_of(r) for r in val["images"]} & {video_of(r) for r in train["images"]}
    assert "split 6 groups" in capsys.readouterr().out
    assert parse_gap("90") == 90 and parse_gap("2m") == 120 and parse_gap("1.5h") == 5400
    with pytest.raises(CocoError, match="--gap"):
        parse_gap("soon")


# ---------------------------------------------------------------------------------------------
# outputs: never over the input, never over another file without --overwrite


def test_split_stats_validate_and_merge_need_overwrite_for_an_existing_file(tmp_path):
    ann, _ = make_set(tmp_path / "set", n=6)
    split, stats, validate = load_tool("split"), load_tool("stats"), load_tool("validate")
    out = tmp_path / "set"
    train, val = out / "train.json", out / "val.json"
    val.write_text("keep me")
    assert split.main([str(ann), "--val", "0.5", "--no-progress"]) == 2
    assert val.read_text() == "keep me" and not train.exists()
    assert split.main([str(ann), "--val", "0.5", "--no-progress", "--overwrite"]) == 0
    assert json.loads(val.read_text())["images"]

    other = tmp_path / "other.json"
    other.write_text("keep me too")
    assert stats.main([str(ann), "--json", str(other)]) == 2
    assert validate.main([str(ann), "--fix", str(other), "--no-progress"]) == 2
    assert other.read_text() == "keep me too"
    assert stats.main([str(ann), "--json", str(other), "--overwrite"]) == 0
    assert "images" in json.loads(other.read_text())
    assert validate.main([str(ann), "--fix", str(other), "--no-progress", "--overwrite"]) == 0
    # the input is never written, --overwrite or not
    before = ann.read_text()
    for argv in (
        [str(ann), "--json", str(ann), "--overwrite"],
        [str(ann), "--fix", str(ann), "--overwrite", "--no-progress"],
    ):
        tool = stats if "--json" in argv else validate
        assert tool.main(argv) == 2
    assert split.main([str(train), "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert ann.read_text() == before


def test_string_and_null_ids_are_named_by_validate_and_fixed(tmp_path):
    ann, data = make_set(tmp_path, n=4)
    data["images"][0]["id"] = "img1"
    data["annotations"][0]["image_id"] = "img1"
    data["annotations"][1]["image_id"] = "img1"
    del data["annotations"][2]["image_id"]
    data["annotations"][3]["category_id"] = None
    data["annotations"][4]["bbox"] = [1, None, 3, 4]
    data["images"][3]["width"] = None
    save(ann, data)
    report = validate_coco(ann, progress=False)
    messages = [p.message for p in report.errors]
    assert any("image id 'img1'" in m and "not an integer" in m for m in messages), messages
    assert any("annotation 3" in m and "no image_id" in m for m in messages), messages
    assert any("annotation 4" in m and "no category_id" in m for m in messages), messages
    assert any("annotation 5" in m and "not four numbers" in m for m in messages), messages
    assert any("image id 4" in m and "width/height" in m for m in messages), messages
    fixed = fix_coco(report)
    assert all(isinstance(im["id"], int) for im in fixed.data["images"])
    new_id = next(im["id"] for im in fixed.data["images"] if im["file_name"] == "img0.jpg")
    # the boxes of the renumbered image (annotations 1 and 2; 2 also named it) follow it
    assert {a["id"] for a in fixed.data["annotations"] if a["image_id"] == new_id} == {1, 2}
    save(tmp_path / "fixed.json", fixed.data)
    assert validate_coco(tmp_path / "fixed.json", tmp_path / "images", progress=False).ok


def test_lone_xyxy_box_is_not_told_to_be_clipped(tmp_path):
    ann, data = make_set(tmp_path, n=4)
    data["annotations"][0]["bbox"] = [30, 20, 60, 45]  # corners inside the 64x48 image
    save(ann, data)
    report = validate_coco(ann, progress=False)
    warning = only(report.warnings, "box_looks_xyxy")
    assert "annotation 1" in warning.message and "[x1, y1, x2, y2]" in warning.message
    assert "--fix would clip it to a wrong box" in warning.message
    assert "box_past_edge" not in kinds(report.warnings)


def test_symlink_out_of_the_image_folder_is_reported(tmp_path):
    ann, data = make_set(tmp_path / "set", n=2)
    outside = tmp_path / "elsewhere" / "img1.jpg"
    outside.parent.mkdir()
    link = tmp_path / "set" / "images" / "img1.jpg"
    link.rename(outside)
    link.symlink_to(outside)
    report = validate_coco(ann, progress=False)
    assert report.ok
    info = only(report.infos, "symlink_outside")
    assert info.image_id == 2 and str(outside) in info.message
