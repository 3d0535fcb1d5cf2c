"""Direct tests of the COCO rules that convert, validate, the loader and pre-flight share."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from detector import coco_rules as rules


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ([1, 2, 3, 4], (1.0, 2.0, 3.0, 4.0)),
        ((1.5, 2, 3, 4), (1.5, 2.0, 3.0, 4.0)),
        ([1, None, 3, 4], None),
        ([1, "2", 3, 4], None),
        ([1, True, 3, 4], None),
        ([1, 2, 3], None),
        (None, None),
        ("1,2,3,4", None),
    ],
)
def test_parse_bbox(bbox, expected):
    assert rules.parse_bbox(bbox) == expected


def test_xywh_problem_and_usable_box():
    assert rules.xywh_problem((0, 0, 1, 1)) is None
    assert rules.xywh_problem((0, math.nan, 1, 1)) == "box_nan"
    assert rules.xywh_problem((0, 0, math.inf, 1)) == "box_nan"
    assert rules.xywh_problem((0, 0, 0, 1)) == "box_empty"
    assert rules.xywh_problem((0, 0, 5, -1)) == "box_empty"
    assert rules.usable_xywh([0, 0, 5, -1]) is None
    assert rules.usable_xywh([0, 0, 5, 1]) == (0.0, 0.0, 5.0, 1.0)


def test_box_position_tolerance_and_outside():
    assert rules.box_position((0, 0, 10, 10), 10, 10) == ("inside", 0.0)
    assert rules.box_position((0, 0, 10.4, 10), 10, 10)[0] == "inside"  # rounding
    where, over = rules.box_position((-2, 0, 5, 5), 10, 10)
    assert where == "past" and over == 2
    assert rules.box_position((10, 0, 5, 5), 10, 10)[0] == "outside"
    assert rules.box_position((-5, 0, 5, 5), 10, 10)[0] == "outside"


def test_clipping_and_the_training_box():
    assert rules.clip_xywh((-2, -2, 6, 20), 10, 10) == (0, 0, 4, 10)
    assert rules.clip_xyxy(-1, 2, 12, 30, 10, 20) == (0, 2, 10, 20)
    assert rules.training_box([-2, -2, 6, 20], 10, 10) == (0, 0, 4, 10)
    assert rules.training_box([12, 0, 5, 5], 10, 10) is None  # nothing left after clipping
    assert rules.training_box([0, 0, 1e-4, 5], 10, 10) is None
    assert rules.training_box([0, None, 1, 1], 10, 10) is None


def test_xyxy_box_problem_reasons():
    assert rules.xyxy_box_problem(1, 1, 5, 5, 10, 10) is None
    assert rules.xyxy_box_problem(-3, 1, 5, 5, 10, 10) is None  # clipped, not skipped
    assert "inverted" in rules.xyxy_box_problem(5, 1, 1, 5, 10, 10)
    assert "entirely outside the 10x10 image" in rules.xyxy_box_problem(11, 1, 15, 5, 10, 10)
    assert "zero area" in rules.xyxy_box_problem(1, 1, 1, 5, 10, 10)
    assert "non-finite" in rules.xyxy_box_problem(math.nan, 1, 1, 5, 10, 10)


def test_xyxy_detection_lone_box_and_set_pattern():
    # [x1, y1, x2, y2] = [50, 40, 90, 80] stored as xywh in a 100x100 image
    assert rules.looks_xyxy((50, 40, 90, 80), 100, 100)
    assert not rules.looks_xyxy((95, 40, 10, 10), 100, 100)  # past the edge, but not corners
    assert not rules.looks_xyxy((10, 10, 20, 20), 100, 100)  # inside: nothing to say
    corners = [((10 * i, 10 * i, 10 * i + 50, 10 * i + 40), 100, 100) for i in range(1, 5)]
    assert rules.xyxy_pattern(corners) == (2, 4)  # i = 3, 4 run past the edge
    honest = [((10, 10, 20, 20), 100, 100)] * 10
    assert rules.xyxy_pattern(honest) is None
    assert rules.xyxy_pattern([]) is None


def test_normalised_problem():
    assert rules.normalised_problem([0, 0.5, 1.0, 1.005, -0.004]) is None  # rounding
    assert "325" in rules.normalised_problem([325, 208, 200, 150])
    assert rules.normalised_problem([0.5, 1.2]) is not None
    assert rules.normalised_problem([-0.5]) is not None


def test_image_size_and_ids():
    assert rules.image_size({"width": 640, "height": 480}) == (640, 480)
    assert rules.image_size({"width": 640.0, "height": 480}) == (640, 480)
    for bad in (None, 0, -5, 640.5, "640", True, math.nan):
        assert rules.image_size({"width": bad, "height": 480}) is None
    assert rules.image_size({"height": 480}) is None
    assert rules.is_int_id(3) and not rules.is_int_id("img1") and not rules.is_int_id(True)


def test_annotation_record_problem():
    ok = {"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}
    assert rules.annotation_record_problem(ok) is None
    assert "image_id" in rules.annotation_record_problem({"category_id": 2})
    assert "category_id" in rules.annotation_record_problem({**ok, "category_id": None})
    assert "'img1' is not an integer" in rules.annotation_record_problem({**ok, "image_id": "img1"})
    assert rules.annotation_record_problem([1, 2]) == "is not an object"


def test_file_name_problem():
    assert rules.file_name_problem("a/b.jpg") is None
    assert "no file_name" in rules.file_name_problem("  ")
    assert "absolute" in rules.file_name_problem("/etc/x.jpg")
    assert "absolute" in rules.file_name_problem("C:\\x.jpg")
    assert "escapes" in rules.file_name_problem("../x.jpg")


def test_area_of():
    assert rules.area_of({"area": 12}) == 12.0
    assert rules.area_of({}) is None
    assert rules.area_of({"area": None}) is None
    assert rules.area_of({"area": math.nan}) is None
    assert rules.area_of({"area": -1}) is None


def test_category_names():
    assert rules.clean_category_name("  Deer ") == "Deer"
    assert rules.clean_category_name("") is None
    assert rules.clean_category_name("   ") is None
    assert rules.clean_category_name(None) is None
    assert rules.case_duplicates(["Deer", "deer", "cat", "DEER", "Cat", "dog"]) == [
        ["Deer", "deer", "DEER"],
        ["cat", "Cat"],
    ]
    assert rules.case_duplicates(["a", "b"]) == []
    assert rules.name_key("  Traffic   Light ") == "traffic light"


def test_placeholder_category_is_the_supercategory_of_every_other():
    cats = [
        {"id": 0, "name": "animals", "supercategory": "none"},
        {"id": 1, "name": "cat", "supercategory": "animals"},
        {"id": 2, "name": "dog", "supercategory": "animals"},
    ]
    anns = [{"category_id": 1}, {"category_id": 2}]
    assert rules.placeholder_category_ids(cats, anns) == {0}
    # the supercategory of only some others is a real (if unused) class, not a placeholder
    cats[2]["supercategory"] = "pets"
    assert rules.placeholder_category_ids(cats, anns) == set()
    # a category with boxes is never a placeholder
    cats[2]["supercategory"] = "animals"
    assert rules.placeholder_category_ids(cats, [*anns, {"category_id": 0}]) == set()
    assert rules.placeholder_category_ids([{"id": 0, "name": "z"}], []) == set()


def test_zero_based_category_ids():
    cats = [{"id": 1}, {"id": 2}]
    assert rules.zero_based_category_ids(cats, [{"category_id": 0}, {"category_id": 1}])
    assert not rules.zero_based_category_ids(cats, [{"category_id": 1}])
    assert not rules.zero_based_category_ids([{"id": 0}, {"id": 1}], [{"category_id": 0}])


def test_image_truncation(shared_datasets, tmp_path):
    jpg = tmp_path / "a.jpg"
    shutil.copy(shared_datasets / "raccoon-voc" / "images" / "raccoon-1.jpg", jpg)
    assert rules.image_truncation(jpg) is None
    jpg.write_bytes(jpg.read_bytes()[:-600])
    assert "truncated" in rules.image_truncation(jpg)
    png = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(png)
    assert rules.image_truncation(png) is None
    png.write_bytes(png.read_bytes()[:-12])
    assert "IEND" in rules.image_truncation(png)
    other = tmp_path / "a.bmp"
    Image.new("RGB", (4, 3)).save(other)
    assert rules.image_truncation(Path(other)) is None
