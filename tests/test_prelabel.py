"""Pre-annotations: each format goes back through our converters with the same boxes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx_fixtures as fx
import pytest

from detector.convert import convert
from detector.prelabel import FORMATS, write_prelabels

PHOTOS = ["raccoon-1", "raccoon-10", "raccoon-100"]
MODEL = "raccoon-v3.onnx"


@pytest.fixture
def photos(tmp_path, shared_datasets) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(shared_datasets / "raccoon-voc" / "images" / f"{name}.jpg", folder)
    return folder


def predicted(photos: Path, shared_datasets: Path):
    """What predict writes: images, results (two classes, varied scores), categories."""
    images, results = [], []
    for i, name in enumerate(PHOTOS, 1):
        frame = fx.raccoon_image(shared_datasets, name)
        images.append(
            {"id": i, "file_name": f"{name}.jpg", "width": frame.shape[1], "height": frame.shape[0]}
        )
        for k, (x1, y1, x2, y2) in enumerate(fx.raccoon_boxes(shared_datasets, name)):
            box = [x1 + 0.25, y1 + 0.5, round(x2 - x1 - 3.33, 2), round(y2 - y1 - 1.75, 2)]
            results.append({"image_id": i, "category_id": 1, "bbox": box, "score": 0.9 - k / 10})
        results.append({"image_id": i, "category_id": 7, "bbox": [5, 6, 40.5, 30], "score": 0.31})
    categories = [{"id": 1, "name": "raccoon"}, {"id": 7, "name": "dog"}]
    return images, results, categories


def boxes_by_file(coco: dict) -> dict[str, list[tuple]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: Path(i["file_name"]).name for i in coco["images"]}
    out: dict[str, list[tuple]] = {}
    for a in coco["annotations"]:
        entry = (names[a["category_id"]], *(round(v, 1) for v in a["bbox"]))
        out.setdefault(files[a["image_id"]], []).append(entry)
    return {k: sorted(v) for k, v in out.items()}


def assert_same_boxes(converted: dict, expected: dict) -> None:
    got, want = boxes_by_file(converted), boxes_by_file(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name], strict=True):
            assert g[0] == w[0]
            assert g[1:] == pytest.approx(w[1:], abs=0.11), name


def expected_coco(images, results, categories) -> dict:
    return {"images": images, "annotations": results, "categories": categories}


@pytest.mark.parametrize("fmt", ["cvat", "coco"])
def test_prelabels_round_trip_through_the_converter(fmt, photos, shared_datasets, tmp_path):
    images, results, categories = predicted(photos, shared_datasets)
    (path,) = write_prelabels(tmp_path / "pre", [fmt], images, results, categories, MODEL)
    report = convert(path, tmp_path / "back", fmt=fmt, images=photos)
    assert report.images == len(PHOTOS)
    converted = json.loads((tmp_path / "back" / "annotations.json").read_text())
    assert_same_boxes(converted, expected_coco(images, results, categories))


def test_prelabels_are_marked_as_predictions(photos, shared_datasets, tmp_path):
    images, results, categories = predicted(photos, shared_datasets)
    out = tmp_path / "pre"
    write_prelabels(out, list(FORMATS), images, results, categories, MODEL)
    cvat = (out / "cvat.xml").read_text()
    assert cvat.count('source="auto"') == len(results)
    assert cvat.count(f'<attribute name="model">{MODEL}</attribute>') == len(results)
    assert '<attribute name="score">0.9000</attribute>' in cvat
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert all(not t.get("annotations") and len(t["predictions"]) == 1 for t in tasks)
    assert {t["predictions"][0]["model_version"] for t in tasks} == {MODEL}
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=raccoon-1.jpg"
    assert tasks[0]["predictions"][0]["result"][0]["score"] == pytest.approx(0.9)
    coco = json.loads((out / "coco.json").read_text())
    assert all(a["model"] == MODEL and 0 < a["score"] < 1 for a in coco["annotations"])


def test_labelstudio_prelabels_skipped_by_default_read_when_reviewed(
    photos, shared_datasets, tmp_path
):
    from detector.convert.common import ConversionError

    images, results, categories = predicted(photos, shared_datasets)
    (path,) = write_prelabels(tmp_path / "pre", ["labelstudio"], images, results, categories, MODEL)
    # Predictions are not labels: nothing to convert until a person submits them.
    with pytest.raises(ConversionError, match="no image could be converted"):
        convert(path, tmp_path / "none", fmt="labelstudio", images=photos)
    # A person accepts them: Label Studio exports the same result as an annotation.
    tasks = json.loads(path.read_text())
    for task in tasks:
        task["annotations"] = [{"id": 1, "result": task["predictions"][0]["result"]}]
    reviewed = tmp_path / "export" / "reviewed.json"
    reviewed.parent.mkdir()
    reviewed.write_text(json.dumps(tasks))
    convert(reviewed, tmp_path / "back", fmt="labelstudio", images=photos)
    converted = json.loads((tmp_path / "back" / "annotations.json").read_text())
    assert_same_boxes(converted, expected_coco(images, results, categories))


def test_labelstudio_prelabels_round_trip_with_include_predictions(
    photos, shared_datasets, tmp_path
):
    images, results, categories = predicted(photos, shared_datasets)
    (path,) = write_prelabels(tmp_path / "pre", ["labelstudio"], images, results, categories, MODEL)
    convert(path, tmp_path / "back", fmt="labelstudio", images=photos, include_predictions=True)
    converted = json.loads((tmp_path / "back" / "annotations.json").read_text())
    assert_same_boxes(converted, expected_coco(images, results, categories))


def test_predict_format_writes_every_prelabel_file(work, shared_datasets, photos, tmp_path, capsys):
    from detector import cli

    model = fx.exported(work, shared_datasets, "b1")[0]
    out = tmp_path / "pre"
    argv = ["predict", str(model), str(photos), "--out", str(out), "--score", "0.1", "--no-draw"]
    assert cli.main([*argv, "--format", *FORMATS]) == 0
    assert "pre-annotations:" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results, "the fixture model finds raccoons in these photos"
    expected = json.loads((out / "images.json").read_text())
    expected["annotations"] = results
    convert(out / "cvat.xml", tmp_path / "back", fmt="cvat", images=photos)
    converted = json.loads((tmp_path / "back" / "annotations.json").read_text())
    assert_same_boxes(converted, expected)
    # A second run does not overwrite the pre-annotations.
    assert cli.main([*argv, "--format", "cvat"]) == 2
    assert "cvat.xml: exists" in capsys.readouterr().err


def test_prelabel_and_predict_import_no_torch():
    code = (
        "import sys, detector.prelabel, detector.predict; "
        "bad = [m for m in ('torch', 'PIL', 'yaml', 'tqdm') if m in sys.modules]; "
        "print(bad)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert "torch" not in out.stdout and "PIL" not in out.stdout
