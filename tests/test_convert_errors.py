"""Converter failure modes and output rules, on small broken copies written into tmp_path.

Malformed XML/JSON/CSV, escaping image names, truncated images: a clear ConversionError that
names the file and the record, and nothing written. Plus clipping, rotation, output naming,
overwrite protection and the command line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detector.convert import ConversionError, FormatDetectionError, convert

REPO = Path(__file__).resolve().parents[1]
LF = "label-formats/datasets"


def make_image(path: Path, size=(200, 100), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, fmt)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expect_error(
    src: Path, out: Path, fmt: str | None = None, match: str | None = None, **kw
) -> str:
    with pytest.raises(ConversionError, match=match) as err:
        convert(src, out, fmt, **kw)
    assert not out.exists(), "nothing may be written when a conversion fails"
    return str(err.value)


def load(out: Path) -> dict:
    return json.loads((out / "annotations.json").read_text())


# ---------------------------------------------------------------------------------------------
# Malformed files.


def test_malformed_cvat_xml(shared_datasets, tmp_path):
    src = tmp_path / "cvat"
    shutil.copytree(shared_datasets / LF / "cvat1.1", src)
    xml = src / "annotations.xml"
    xml.write_text(xml.read_text()[:3000])  # cut inside <meta>
    msg = expect_error(src, tmp_path / "out", "cvat")
    assert str(xml) in msg and "malformed XML at line" in msg


def test_malformed_voc_xml_autodetected(shared_datasets, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(shared_datasets / LF / "labelImg", src)
    bad = src / "shapes.xml"
    bad.write_text(bad.read_text().replace("</xmin>", "</xmn>", 1))
    msg = expect_error(src, tmp_path / "out")
    assert str(bad) in msg and "mismatched tag" in msg and "line 20" in msg


def test_voc_bad_number_names_object(shared_datasets, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(shared_datasets / LF / "labelImg", src)
    bad = src / "strawberry.xml"
    bad.write_text(bad.read_text().replace("<xmin>242</xmin>", "<xmin>24two</xmin>", 1))
    msg = expect_error(src, tmp_path / "out", "voc")
    assert str(bad) in msg and "object #1 (strawberry)" in msg and "'24two'" in msg


def test_malformed_coco_json(shared_datasets, tmp_path):
    src = tmp_path / "coco"
    shutil.copytree(shared_datasets / LF / "coco1.0", src)
    js = src / "annotations" / "instances_default.json"
    js.write_text(js.read_text()[:-40])
    msg = expect_error(src, tmp_path / "out", "coco")
    assert str(js) in msg and "malformed JSON at line 1" in msg
    msg = expect_error(src, tmp_path / "out2")  # auto-detect says why it found nothing
    assert str(js) in msg and "malformed JSON" in msg


def test_coco_bad_bbox_names_annotation(shared_datasets, tmp_path):
    src = tmp_path / "coco"
    shutil.copytree(shared_datasets / LF / "coco1.0", src)
    js = src / "annotations" / "instances_default.json"
    data = json.loads(js.read_text())
    data["annotations"][6]["bbox"] = [1, 2, 3]
    js.write_text(json.dumps(data))
    msg = expect_error(js, tmp_path / "out")
    assert "annotation id 7" in msg and "bbox must be" in msg


def test_malformed_labelstudio_json(shared_datasets, tmp_path):
    src = tmp_path / "ls.json"
    ls = (
        shared_datasets
        / "rabbit-roboflow-labelstudio/train/project-3-at-2022-11-30-15-10-6dd53f9a.json"
    )
    src.write_text(ls.read_text()[:5000])
    msg = expect_error(src, tmp_path / "out", "labelstudio")
    assert str(src) in msg and "malformed JSON" in msg


def test_malformed_labelme_json(shared_datasets, tmp_path):
    src = tmp_path / "lm"
    shutil.copytree(shared_datasets / LF / "labelme", src)
    bad = src / "birds.json"
    bad.write_text(bad.read_text().replace('"shapes": [', '"shapes": [,', 1))
    msg = expect_error(src, tmp_path / "out")
    assert str(bad) in msg and "line 4, column 14" in msg


def test_malformed_automl_csv(tmp_path):
    make_image(tmp_path / "deer" / "images" / "a.jpg")
    csv_path = tmp_path / "deer" / "labels.csv"
    ok = "UNASSIGNED,gs://b/a.jpg,Deer,0.1,0.2,,,0.5,0.6,,\n"
    csv_path.write_text(ok + 'UNASSIGNED,"gs://b/a.jpg,Deer,0.1,0.2,,,0.5,0.6,,\n')
    msg = expect_error(csv_path, tmp_path / "out", "automl")
    assert str(csv_path) in msg and "malformed CSV" in msg
    csv_path.write_text(ok + "UNASSIGNED,gs://b/a.jpg,Deer,0.1,abc,,,0.5,0.6,,\n")
    msg = expect_error(csv_path, tmp_path / "out", "automl")
    assert "line 2" in msg and "'abc'" in msg
    csv_path.write_text(ok + "UNASSIGNED,gs://b/a.jpg,Deer,0.1,0.2,0.5\n")
    msg = expect_error(csv_path, tmp_path / "out", "automl")
    assert "line 2" in msg and "expected 8 coordinate columns" in msg


def test_malformed_via_csv(shared_datasets, tmp_path):
    src = tmp_path / "via"
    src.mkdir()
    shutil.copy(shared_datasets / LF / "via" / "strawberry.jpg", src)
    lines = (shared_datasets / LF / "via" / "via_region_data.csv").read_text().splitlines()
    lines[3] = lines[3].replace('""x""', 'x""')
    (src / "via_region_data.csv").write_text("\n".join(lines) + "\n")
    msg = expect_error(src / "via_region_data.csv", tmp_path / "out")
    assert "via_region_data.csv: line 4" in msg and "malformed JSON" in msg


def test_malformed_yolo_line(shared_datasets, tmp_path):
    src = tmp_path / "yolo"
    shutil.copytree(shared_datasets / LF / "yolo", src)
    (src / "crack.txt").write_text("1 0.638281 0.494444 0.406250\n")
    msg = expect_error(src, tmp_path / "out", "yolo")
    assert str(src / "crack.txt") in msg and "line 1" in msg and "got 4 values" in msg


# ---------------------------------------------------------------------------------------------
# Escaping image names.


def _coco(root: Path, file_name: str) -> Path:
    make_image(root / "images" / "ok.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "ok.jpg", "width": 200, "height": 100},
            {"id": 2, "file_name": file_name, "width": 200, "height": 100},
        ],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = root / "coco.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "name",
    ["../secret.jpg", "../../etc/hosts", "/etc/hosts", "C:\\Windows\\x.jpg", "sub/../../x.jpg"],
)
def test_coco_escaping_file_name(tmp_path, name):
    make_image(tmp_path / "secret.jpg")  # exists outside the image folder: must not be read
    src = _coco(tmp_path / "export", name)
    msg = expect_error(src, tmp_path / "out", images=tmp_path / "export" / "images")
    assert str(src) in msg and "image id 2" in msg
    assert "escapes" in msg or "absolute" in msg


def test_voc_escaping_filename(shared_datasets, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(shared_datasets / LF / "labelImg", src)
    make_image(tmp_path / "outside.jpg")
    bad = src / "birds.xml"
    bad.write_text(bad.read_text().replace("<filename>birds.jpg", "<filename>../outside.jpg"))
    msg = expect_error(src, tmp_path / "out", "voc")
    assert str(bad) in msg and "'../outside.jpg'" in msg and "escapes" in msg


def test_labelme_escaping_image_path(shared_datasets, tmp_path):
    src = tmp_path / "lm"
    shutil.copytree(shared_datasets / LF / "labelme", src)
    bad = src / "crack.json"
    data = json.loads(bad.read_text())
    data["imagePath"] = "../crack.jpeg"
    bad.write_text(json.dumps(data))
    shutil.copy(src / "crack.jpeg", tmp_path / "crack.jpeg")
    msg = expect_error(src, tmp_path / "out", "labelme")
    assert str(bad) in msg and "escapes" in msg


def test_labelstudio_escaping_local_file(tmp_path):
    make_image(tmp_path / "secret.jpg")
    src = tmp_path / "ls" / "export.json"
    src.parent.mkdir()
    src.write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "data": {"image": "/data/local-files/?d=../secret.jpg"},
                    "annotations": [{"id": 1, "result": []}],
                }
            ]
        )
    )
    msg = expect_error(src, tmp_path / "out", "labelstudio")
    assert "task id 1" in msg and "escapes" in msg


# ---------------------------------------------------------------------------------------------
# Broken images.


def test_truncated_image(shared_datasets, tmp_path):
    src = tmp_path / "yolo"
    shutil.copytree(shared_datasets / LF / "yolo", src)
    img = src / "birds.jpg"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    msg = expect_error(src, tmp_path / "out", strict=True)
    assert str(img) in msg and "birds.txt" in msg and "truncated" in msg


def test_truncated_image_keeps_previous_output(shared_datasets, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(shared_datasets / LF / "labelImg", src)
    out = tmp_path / "out"
    convert(src, out)
    before = tree_digest(out)
    img = src / "crack.jpeg"
    img.write_bytes(img.read_bytes()[:5000])
    with pytest.raises(ConversionError, match="truncated"):
        convert(src, out, overwrite=True, strict=True)
    assert tree_digest(out) == before


def test_unreadable_image(shared_datasets, tmp_path):
    src = tmp_path / "cvat"
    shutil.copytree(shared_datasets / LF / "cvat1.1", src)
    (src / "images" / "shapes.jpg").write_bytes(b"not an image at all" * 10)
    msg = expect_error(src, tmp_path / "out", strict=True)
    assert "shapes.jpg" in msg and "image id 2" in msg and "not a readable image" in msg


# ---------------------------------------------------------------------------------------------
# Boxes: clipping, skipping, rotation.


def test_yolo_clip_outside_zero_area_unknown_class(tmp_path):
    src = tmp_path / "yolo"
    make_image(src / "a.jpg", (100, 50))
    (src / "classes.txt").write_text("thing\n")
    (src / "a.txt").write_text(
        "0 0.95 0.5 0.2 0.2\n"  # x 85..105: clipped to 85..100
        "0 1.009 0.5 0.01 0.1\n"  # entirely right of the image (within rounding of [0, 1])
        "0 0.5 0.5 0 0.1\n"  # zero width
        "3 0.5 0.5 0.1 0.1\n"  # class 3 of 1
        "0 0.5 0.5 0.2 0.2\n"
    )
    report = convert(src, tmp_path / "out")
    coco = load(tmp_path / "out")
    assert [a["bbox"] for a in coco["annotations"]] == [
        [85.0, 20.0, 15.0, 10.0],
        [40.0, 20.0, 20.0, 10.0],
    ]
    assert report.clipped == 1
    reasons = {s.record.split(", ")[-1]: s.reason for s in report.skipped}
    assert set(reasons) == {"line 2", "line 3", "line 4"}
    assert "entirely outside the 100x50 image" in reasons["line 2"]
    assert "zero area" in reasons["line 3"]
    assert "unknown class id 3" in reasons["line 4"]
    assert all(s.file.endswith("a.txt") for s in report.skipped)


def test_labelstudio_rotation_prefix_and_missing(tmp_path):
    root = tmp_path / "ls"
    make_image(root / "photo.jpg", (200, 100))
    task = {
        "id": 7,
        "data": {"image": "/data/upload/3/0a1b2c3d-photo.jpg"},
        "annotations": [
            {
                "id": 1,
                "result": [
                    {
                        "id": "r1",
                        "type": "rectanglelabels",
                        "original_width": 200,
                        "original_height": 100,
                        "image_rotation": 0,
                        "value": {
                            "x": 10,
                            "y": 10,
                            "width": 20,
                            "height": 10,
                            "rotation": 90,
                            "rectanglelabels": ["cat"],
                        },
                    },
                    {
                        "id": "r2",
                        "type": "rectanglelabels",
                        "value": {
                            "x": 50,
                            "y": 50,
                            "width": 10,
                            "height": 10,
                            "rotation": 0,
                            "rectanglelabels": ["dog"],
                        },
                    },
                    {
                        "id": "r3",
                        "type": "keypointlabels",
                        "value": {"x": 1, "y": 1, "keypointlabels": ["cat"]},
                    },
                ],
            }
        ],
    }
    gone = {
        "id": 8,
        "data": {"image": "/data/upload/3/deadbeef-gone.jpg"},
        "annotations": [{"id": 2, "result": []}],
    }
    src = root / "export.json"
    src.write_text(json.dumps([task, gone]))
    report = convert(src, tmp_path / "out")
    coco = load(tmp_path / "out")
    # 40x10 px rectangle at (20, 10), rotated 90 deg clockwise about its top-left corner:
    # it now spans x 10..20, y 10..50
    assert [a["bbox"] for a in coco["annotations"]] == [
        [10.0, 10.0, 10.0, 40.0],
        [100.0, 50.0, 20.0, 10.0],
    ]
    assert coco["images"][0]["file_name"] == "photo.jpg"
    assert any("rotated rectangles" in n for n in report.notes)
    reasons = [s.reason for s in report.skipped]
    assert any("'keypointlabels' is not a box" in r for r in reasons)
    assert any("'gone.jpg'" in r and "not found" in r for r in reasons)


def test_voc_names_restrict_categories(shared_datasets, tmp_path):
    report = convert(
        shared_datasets / LF / "labelImg", tmp_path / "out", names=["strawberry", "bird"]
    )
    coco = load(tmp_path / "out")
    assert [c["name"] for c in coco["categories"]] == ["strawberry", "bird"]
    assert report.boxes == 19  # 17 strawberries + 2 birds
    unknown = [s for s in report.skipped if s.reason.startswith("unknown label")]
    assert len(unknown) == 6  # crack + 5 shapes


def test_voc_missing_image_reported(shared_datasets, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(shared_datasets / LF / "labelImg", src)
    (src / "crack.jpeg").unlink()
    report = convert(src, tmp_path / "out")
    assert report.images == 3 and report.boxes == 24
    (skip,) = report.skipped
    assert (
        skip.file.endswith("crack.xml") and "not found" in skip.reason and "1 boxes" in skip.reason
    )


def test_labelme_uses_image_data_when_file_missing(shared_datasets, tmp_path):
    src = tmp_path / "lm"
    src.mkdir()
    shutil.copy(shared_datasets / LF / "labelme" / "birds.json", src)
    report = convert(src, tmp_path / "out")
    coco = load(tmp_path / "out")
    assert coco["images"][0]["file_name"] == "birds.jpg"
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (1000, 666)
    assert report.boxes == 2 and any("embedded image data" in n for n in report.notes)
    with Image.open(tmp_path / "out" / "images" / "birds.jpg") as im:
        assert im.size == (1000, 666)


def test_automl_four_vertices_without_set_column(tmp_path):
    make_image(tmp_path / "a" / "images" / "x.png", (200, 100), "PNG")
    (tmp_path / "a" / "labels.csv").write_text(
        "gs://bucket/dir/x.png,Deer,0.1,0.2,0.5,0.2,0.5,0.6,0.1,0.6\n"
    )
    report = convert(tmp_path / "a", tmp_path / "out", "automl")
    assert report.boxes == 1
    assert load(tmp_path / "out")["annotations"][0]["bbox"] == [20.0, 20.0, 80.0, 40.0]


# ---------------------------------------------------------------------------------------------
# Output rules.


def test_flat_unique_output_names(tmp_path):
    root = tmp_path / "export"
    names = ["train/a.jpg", "val/a.jpg", "train__a.jpg", "sub/deep/b.jpg"]
    for n in names:
        make_image(root / "images" / n)
    data = {
        "images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 5, "bbox": [1, 2, 3, 4]}
            for i in range(len(names))
        ],
        "categories": [{"id": 5, "name": "thing"}],
    }
    (root / "coco.json").write_text(json.dumps(data))
    convert(root / "coco.json", tmp_path / "out")
    out = [i["file_name"] for i in load(tmp_path / "out")["images"]]
    assert all("/" not in n for n in out) and len(set(out)) == 4
    assert out[1] == "val__a.jpg" and out[3] == "sub__deep__b.jpg"
    # train/a.jpg and train__a.jpg would both be train__a.jpg: each gets a hash of its path
    assert out[0] != out[2] and out[0].startswith("train__a.") and out[2].startswith("train__a.")
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(out)


def test_input_unchanged_and_copies(shared_datasets, tmp_path):
    src = tmp_path / "cvat"
    shutil.copytree(shared_datasets / LF / "cvat1.1", src)
    before = tree_digest(src)
    convert(src, tmp_path / "out")
    assert tree_digest(src) == before
    out_images = tmp_path / "out" / "images"
    assert not any(p.is_symlink() for p in out_images.iterdir())
    assert tree_digest(out_images) == {
        k.removeprefix("images/"): v for k, v in before.items() if k.startswith("images/")
    }


def test_refuses_to_write_into_the_source(shared_datasets, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(shared_datasets / LF / "coco1.0", src)
    before = tree_digest(src)
    for out in (src, src / "annotations", src / "converted"):
        with pytest.raises(ConversionError, match="never write into their input"):
            convert(src, out, overwrite=True)
    # a COCO file called annotations.json, converted into its own folder
    (src / "annotations" / "instances_default.json").rename(src / "annotations.json")
    with pytest.raises(ConversionError):
        convert(src / "annotations.json", src, overwrite=True)
    assert tree_digest(src) == {
        k.replace("annotations/instances_default.json", "annotations.json"): v
        for k, v in before.items()
    }


def test_existing_output_needs_overwrite(shared_datasets, tmp_path):
    out = tmp_path / "out"
    convert(shared_datasets / LF / "yolo", out)
    with pytest.raises(ConversionError, match="--overwrite"):
        convert(shared_datasets / LF / "labelImg", out)
    report = convert(shared_datasets / LF / "labelme3.0", out, overwrite=True)
    assert report.written and load(out)["info"]["source_format"] == "labelme3"
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "images"]


def test_ambiguous_source_writes_nothing(shared_datasets, tmp_path):
    with pytest.raises(FormatDetectionError) as err:
        convert(shared_datasets / LF / "phones", tmp_path / "out")
    assert err.value.candidates == ["voc", "yolo"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Command line.


def _cli():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_end_to_end(shared_datasets, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "convert.py"),
            str(shared_datasets / LF / "cvat1.1"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "detected format: cvat (annotations.xml)" in proc.stdout
    assert "polyline #1 (crack): a polyline is not a region" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("cvat: 4 images (1 without boxes), 23 boxes, 8 categories")
    assert (out / "annotations.json").is_file()


def test_cli_errors_and_names_file(shared_datasets, tmp_path, capsys):
    cli = _cli()
    assert cli.main([str(shared_datasets / LF / "phones"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "voc" in err and "yolo" in err and "--from" in err
    names = tmp_path / "names.txt"
    names.write_text("logo\ncamera\nled\n")
    assert (
        cli.main(
            [
                str(shared_datasets / LF / "phones"),
                "--from",
                "yolo",
                "--out",
                str(tmp_path / "o"),
                "--names-file",
                str(names),
                "--link",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "class names from --names" in out and "yolo: 2 images, 10 boxes" in out
    assert (tmp_path / "o" / "images").is_dir()


def test_coco_negative_size_and_unknown_ids_skipped(tmp_path):
    make_image(tmp_path / "e" / "a.jpg", (200, 100))
    data = {
        "images": [{"id": 3, "file_name": "a.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 3, "category_id": 1, "bbox": [50, 10, -20, 10]},
            {"id": 11, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 12, "image_id": 3, "category_id": 42, "bbox": [1, 1, 5, 5]},
            {"id": 13, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "e" / "c.json").write_text(json.dumps(data))
    report = convert(tmp_path / "e" / "c.json", tmp_path / "out")
    reasons = {s.record.split(", ")[-1]: s.reason for s in report.skipped}
    assert "inverted box" in reasons["annotation id 10"]
    assert reasons["annotation id 11"] == "unknown image id 99"
    assert reasons["annotation id 12"] == "unknown category id 42"
    (ann,) = load(tmp_path / "out")["annotations"]
    assert ann["iscrowd"] == 1 and ann["id"] == 1 and ann["image_id"] == 1


def test_nothing_converted_is_an_error(tmp_path):
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "classes.txt").write_text("a\n")
    (tmp_path / "y" / "x.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    msg = expect_error(tmp_path / "y", tmp_path / "out")
    assert "no image could be converted" in msg and "label file has no image" in msg


def test_dry_run_writes_nothing(shared_datasets, tmp_path):
    report = convert(shared_datasets / LF / "CreateML", tmp_path / "out", dry_run=True)
    assert (report.images, report.boxes, report.written) == (4, 25, False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# One set of rules: what convert refuses (layout) and what it skips (one image).

RACCOON = "raccoon-voc"


def raccoon_voc(shared_datasets: Path, dst: Path, numbers=(1, 2, 3)) -> Path:
    """A small VOC export copied from the real raccoon set: annotations/ + images/."""
    for n in numbers:
        for sub, ext in (("annotations", "xml"), ("images", "jpg")):
            target = dst / sub / f"raccoon-{n}.{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_datasets / RACCOON / sub / f"raccoon-{n}.{ext}", target)
    return dst


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, list[int]]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def test_cvat_rotation_that_is_not_a_number_names_the_shape(shared_datasets, tmp_path):
    src = tmp_path / "cvat"
    shutil.copytree(shared_datasets / LF / "cvat1.1", src)
    xml = src / "annotations.xml"
    text = xml.read_text()
    xml.write_text(
        text.replace('<box label="rectangle"', '<box rotation="abc" label="rectangle"', 1)
    )
    msg = expect_error(src, tmp_path / "out", "cvat")
    assert str(xml) in msg and "image id 2" in msg and "rotation" in msg and "'abc'" in msg


def test_labelme_image_data_bomb_is_refused_naming_the_file(shared_datasets, tmp_path):
    import base64

    from test_faults_data import huge_png

    src = tmp_path / "lm"
    shutil.copytree(shared_datasets / LF / "labelme", src)
    bomb = tmp_path / "bomb.png"
    huge_png(bomb)  # 20000 x 20000, ~50 KB on disk
    json_path = src / "crack.json"
    data = json.loads(json_path.read_text())
    (src / data["imagePath"]).unlink()  # the file is absent: the embedded data is used
    data["imageData"] = base64.b64encode(bomb.read_bytes()).decode()
    data.pop("imageWidth", None), data.pop("imageHeight", None)
    json_path.write_text(json.dumps(data))
    msg = expect_error(src, tmp_path / "out", "labelme")
    assert str(json_path) in msg and "imageData" in msg and "too large" in msg


def test_voc_size_of_the_raw_exif_frame_refuses_the_export(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "voc", (1, 2))
    jpg = src / "images" / "raccoon-2.jpg"
    with Image.open(jpg) as im:
        raw_w, raw_h = im.size
        exif = Image.Exif()
        exif[0x0112] = 6  # displayed turned by 90 degrees: raw_h x raw_w
        im.save(jpg, exif=exif, quality=95)
    (src / "annotations" / "raccoon-2.xml").write_text(
        voc_xml("raccoon-2.jpg", (raw_w, raw_h), [("raccoon", [10, 10, raw_w - 5, 100])])
    )
    msg = expect_error(src, tmp_path / "out", "voc")
    assert "raccoon-2.xml" in msg and f"says {raw_w}x{raw_h}" in msg
    assert "EXIF orientation" in msg and "exiftool -Orientation=1 -n" in msg


def test_cvat_size_that_disagrees_with_the_file_refuses_the_export(shared_datasets, tmp_path):
    src = tmp_path / "cvat"
    shutil.copytree(shared_datasets / LF / "cvat1.1", src)
    xml = src / "annotations.xml"
    xml.write_text(xml.read_text().replace('width="588" height="643"', 'width="294" height="321"'))
    msg = expect_error(src, tmp_path / "out", "cvat")
    assert "shapes.jpg" in msg and "says 294x321" in msg and "588x643" in msg
    assert "put back the file that was labelled" in msg


def _coco_export(tmp_path: Path, shared_datasets: Path, anns: list, categories: list) -> Path:
    src = tmp_path / "coco"
    images = []
    for i in (1, 2, 3):
        path = src / "images" / f"raccoon-{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_datasets / RACCOON / "images" / path.name, path)
        with Image.open(path) as im:
            images.append({"id": i, "file_name": path.name, "width": im.width, "height": im.height})
    (src / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories})
    )
    return src / "annotations.json"


def test_coco_with_xyxy_boxes_is_refused_not_clipped(shared_datasets, tmp_path):
    # raccoon-1 is 650x417: [x1, y1, x2, y2] corners well inside, read as xywh they run past
    corners = [[81, 88, 522, 408], [100, 120, 600, 400], [200, 150, 640, 410]]
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 1.0, "iscrowd": 0}
        for i, b in enumerate(corners)
    ]
    src = _coco_export(tmp_path, shared_datasets, anns, [{"id": 1, "name": "raccoon"}])
    msg = expect_error(src, tmp_path / "out", "coco")
    assert "[x1, y1, x2, y2]" in msg and "--xyxy" in msg


def test_coco_with_zero_based_category_ids_is_refused(shared_datasets, tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 50, 50], "area": 2500},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500},
    ]
    cats = [{"id": 1, "name": "raccoon"}, {"id": 2, "name": "dog"}]
    src = _coco_export(tmp_path, shared_datasets, anns, cats)
    msg = expect_error(src, tmp_path / "out", "coco")
    assert str(src) in msg and "0-based" in msg


@pytest.mark.parametrize(
    ("line", "values"),
    [("0 325 208 200 150", "325"), ("0 0.5 0.5 0.2 1.8", "1.8")],
)
def test_yolo_pixel_coordinates_are_refused_with_the_line(shared_datasets, tmp_path, line, values):
    src = tmp_path / "yolo"
    shutil.copytree(shared_datasets / LF / "yolo", src)
    label = src / "birds.txt"
    label.write_text(label.read_text().rstrip("\n") + "\n" + line + "\n")
    lineno = len(label.read_text().splitlines())
    msg = expect_error(src, tmp_path / "out", "yolo")
    assert str(label) in msg and f"line {lineno}" in msg and values in msg
    assert "outside [0, 1]" in msg and "pixels" in msg


def test_automl_pixel_coordinates_are_refused_with_the_line(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "deer", (1,))
    csv_path = src / "labels.csv"
    csv_path.write_text(
        "UNASSIGNED,gs://b/raccoon-1.jpg,Deer,0.1,0.2,,,0.5,0.6,,\n"
        "UNASSIGNED,gs://b/raccoon-1.jpg,Deer,81,88,,,522,408,,\n"
    )
    msg = expect_error(csv_path, tmp_path / "out", "automl")
    assert str(csv_path) in msg and "line 2" in msg and "outside [0, 1]" in msg


def test_automl_unclosed_quote_names_the_line(tmp_path):
    make_image(tmp_path / "deer" / "images" / "a.jpg")
    csv_path = tmp_path / "deer" / "labels.csv"
    ok = "UNASSIGNED,gs://b/a.jpg,Deer,0.1,0.2,,,0.5,0.6,,\n"
    csv_path.write_text(ok + ok + 'UNASSIGNED,"gs://b/a.jpg,Deer,0.1,0.2,,,0.5,0.6,,\n' + ok)
    msg = expect_error(csv_path, tmp_path / "out", "automl")
    assert "malformed CSV" in msg and "line 3" in msg


def test_voc_empty_class_name_is_refused(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "voc", (1, 2))
    xml = src / "annotations" / "raccoon-2.xml"
    xml.write_text(xml.read_text().replace("<name>raccoon</name>", "<name></name>", 1))
    msg = expect_error(src, tmp_path / "out", "voc")
    assert str(xml) in msg and "object #1" in msg and "empty class name" in msg


def test_class_names_are_stripped_and_case_duplicates_refused_or_merged(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "voc", (1, 2, 3))
    for n, name in ((2, " raccoon "), (3, "Raccoon")):
        xml = src / "annotations" / f"raccoon-{n}.xml"
        xml.write_text(xml.read_text().replace("<name>raccoon</name>", f"<name>{name}</name>"))
    msg = expect_error(src, tmp_path / "out", "voc")
    assert "'raccoon' and 'Raccoon'" in msg and "--merge-case" in msg

    report = convert(src, tmp_path / "out", "voc", merge_case=True)
    coco = load(tmp_path / "out")
    assert [c["name"] for c in coco["categories"]] == ["raccoon"]
    assert report.boxes_per_category == {"raccoon": report.boxes}
    assert any("'Raccoon' -> 'raccoon'" in n for n in report.notes)


def test_one_truncated_image_of_a_real_export_is_skipped_and_listed(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "voc", (1, 2, 3, 4))
    bad = src / "images" / "raccoon-3.jpg"
    bad.write_bytes(bad.read_bytes()[:-600])  # OpenCV still decodes it (grey bottom rows)
    unreadable = src / "images" / "raccoon-4.jpg"
    unreadable.write_bytes(b"not a JPEG" * 50)
    tool = load_convert_tool()
    out = tmp_path / "out"
    assert tool.main([str(src), "--out", str(out)]) == 0
    coco = load(out)
    assert sorted(Path(im["source_file"]).name for im in coco["images"]) == [
        "raccoon-1.jpg",
        "raccoon-2.jpg",
    ]
    report = convert(src, None, dry_run=True)
    skipped = {s.record.rsplit(": ", 1)[-1]: s.reason for s in report.skipped_images}
    assert set(skipped) == {"raccoon-3.jpg", "raccoon-4.jpg"}
    assert (
        "truncated" in skipped["raccoon-3.jpg"]
        and "not a readable image" in skipped["raccoon-4.jpg"]
    )
    assert "2 unusable images skipped" in report.summary()
    assert "raccoon-3.jpg" in report.text() and "--strict" in report.text()
    # --strict: all or nothing
    assert tool.main([str(src), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert not (tmp_path / "strict").exists()


def load_convert_tool():
    spec = importlib.util.spec_from_file_location("tools_convert", REPO / "tools" / "convert.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labelstudio_predictions_only_with_include_predictions(shared_datasets, tmp_path):
    src = raccoon_voc(shared_datasets, tmp_path / "ls", (1, 2))
    box = {
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": 650,
        "original_height": 417,
        "value": {"x": 10, "y": 20, "width": 50, "height": 40, "rectanglelabels": ["raccoon"]},
    }
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/1/raccoon-1.jpg"},
            "annotations": [{"id": 11, "result": [{**box, "id": "a"}]}],
        },
        {
            "id": 2,
            "data": {"image": "/data/upload/1/raccoon-2.jpg"},
            "annotations": [],
            "predictions": [{"id": 21, "model_version": "m", "result": [{**box, "id": "p"}]}],
        },
    ]
    export = src / "images" / "export.json"
    export.write_text(json.dumps(tasks))
    default = convert(export, None, "labelstudio", dry_run=True)
    assert default.images == 1 and default.boxes == 1
    assert any("--include-predictions" in s.reason for s in default.skipped)
    report = convert(export, tmp_path / "out", "labelstudio", include_predictions=True)
    assert report.images == 2 and report.boxes == 2
    assert any("prediction" in n for n in report.notes)
    cli_out = tmp_path / "cli"
    argv = [str(export), "--from", "labelstudio", "--out", str(cli_out), "--include-predictions"]
    assert load_convert_tool().main(argv) == 0
    assert len(load(cli_out)["annotations"]) == 2
    coco = load(tmp_path / "out")
    assert coco["annotations"][1]["bbox"] == [80.0, 114.6, 400.0, 229.2]  # raccoon-2: 800x573
