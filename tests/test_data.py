import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detector.config import AugmentConfig
from detector.data import (
    DatasetError,
    DetectionDataset,
    build_augmentation,
    epoch_batches,
    load_coco,
)
from detector.fileio import ImageReadError, UnsafePathError, exif_image_size, read_image_rgb


def write_set(root, images, annotations, categories=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / "annotations.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": categories or [{"id": 3, "name": "deer"}, {"id": 7, "name": "sign"}],
            }
        )
    )
    return path


def blank(root, name, width=64, height=48):
    cv2.imwrite(str(root / "images" / name), np.full((height, width, 3), 128, np.uint8))
    return {
        "id": len(list((root / "images").iterdir())),
        "file_name": name,
        "width": width,
        "height": height,
    }


def test_boxes_converted_clamped_and_filtered(tmp_path):
    (tmp_path / "images").mkdir()
    a = blank(tmp_path, "a.jpg")
    b = blank(tmp_path, "b.jpg")  # a negative: no boxes at all
    anns = [
        {"id": 1, "image_id": a["id"], "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0},
        {
            "id": 2,
            "image_id": a["id"],
            "category_id": 3,
            "bbox": [50, 40, 30, 30],
            "iscrowd": 0,
        },  # clamped
        {
            "id": 3,
            "image_id": a["id"],
            "category_id": 3,
            "bbox": [5, 5, 0, 10],
            "iscrowd": 0,
        },  # zero width
        {
            "id": 4,
            "image_id": a["id"],
            "category_id": 3,
            "bbox": [70, 10, 5, 5],
            "iscrowd": 0,
        },  # outside
        {
            "id": 5,
            "image_id": a["id"],
            "category_id": 3,
            "bbox": [1, 1, 30, 30],
            "iscrowd": 1,
        },  # crowd
    ]
    cset = load_coco(write_set(tmp_path, [a, b], anns))
    assert cset.class_names == ["deer", "sign"]  # category order of the file
    assert cset.category_ids == [3, 7]
    np.testing.assert_allclose(cset.boxes[a["id"]], [[10, 5, 30, 15], [50, 40, 64, 48]])
    assert cset.labels[a["id"]].tolist() == [2, 1]
    assert cset.dropped_boxes == 2 and cset.crowd_boxes == 1
    dataset = DetectionDataset(cset)
    image, target = dataset[1]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["labels"].dtype == torch.int64


def test_unknown_category_and_duplicate_ids_name_the_record(tmp_path):
    (tmp_path / "images").mkdir()
    a = blank(tmp_path, "a.jpg")
    path = write_set(
        tmp_path, [a], [{"id": 9, "image_id": a["id"], "category_id": 0, "bbox": [1, 1, 5, 5]}]
    )
    with pytest.raises(DatasetError, match=r"annotation id 9 has category_id 0"):
        load_coco(path)
    path = write_set(tmp_path, [a, {**a}], [])
    with pytest.raises(DatasetError, match=r"duplicate image id 1"):
        load_coco(path)


def test_malformed_json(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(bad)
    bad.write_text("[]")
    with pytest.raises(DatasetError, match="top level"):
        load_coco(bad)


def test_path_escaping_file_name_refused(tmp_path):
    (tmp_path / "images").mkdir()
    path = write_set(
        tmp_path, [{"id": 1, "file_name": "../../etc/passwd", "width": 5, "height": 5}], []
    )
    dataset = DetectionDataset(load_coco(path))
    with pytest.raises(UnsafePathError, match="escapes"):
        dataset[0]


def test_image_formats_become_rgb_uint8(tmp_path):
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), np.full((10, 12), 200, np.uint8))
    rgba = tmp_path / "rgba.png"
    cv2.imwrite(
        str(rgba), np.dstack([np.zeros((10, 12, 3), np.uint8), np.full((10, 12), 9, np.uint8)])
    )
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), np.full((10, 12, 3), 65535, np.uint16))
    png_named_jpg = tmp_path / "really_png.jpg"
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((10, 12, 3), np.uint8))
    (tmp_path / "x.png").rename(png_named_jpg)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(cmyk)
    for path in (gray, rgba, deep, png_named_jpg, cmyk):
        image = read_image_rgb(path)
        assert image.shape == (10, 12, 3) and image.dtype == np.uint8, path
    assert read_image_rgb(gray)[0, 0].tolist() == [200, 200, 200]
    assert read_image_rgb(deep)[0, 0].tolist() == [255, 255, 255]


def test_unreadable_image_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image_rgb(broken)
    with pytest.raises(ImageReadError, match="not found"):
        read_image_rgb(tmp_path / "missing.jpg")


def exif_rotated_jpeg(path, raw_width=40, raw_height=20):
    """A JPEG stored landscape with EXIF orientation 6 (displayed portrait, rotated 90 cw)."""
    raw = np.zeros((raw_height, raw_width, 3), np.uint8)
    raw[:, : raw_width // 4] = (255, 0, 0)  # red stripe on the raw left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(path, exif=exif, quality=95)


def test_exif_rotation_is_honoured(tmp_path):
    (tmp_path / "images").mkdir()
    exif_rotated_jpeg(tmp_path / "images/rot.jpg")
    assert exif_image_size(tmp_path / "images/rot.jpg") == (20, 40)
    image = read_image_rgb(tmp_path / "images/rot.jpg")
    assert image.shape == (40, 20, 3)
    assert image[2, 10, 0] > 200 and image[-2, 10, 0] < 60  # raw left edge is now the top
    ok = write_set(
        tmp_path,
        [{"id": 1, "file_name": "rot.jpg", "width": 20, "height": 40}],
        [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 1, 10, 5]}],
    )
    image, target = DetectionDataset(load_coco(ok))[0]
    assert image.shape == (3, 40, 20)
    stale = write_set(tmp_path, [{"id": 1, "file_name": "rot.jpg", "width": 40, "height": 20}], [])
    with pytest.raises(ImageReadError, match="EXIF"):
        DetectionDataset(load_coco(stale))[0]


def test_augmentation_is_bbox_safe_and_reproducible(tmp_path):
    (tmp_path / "images").mkdir()
    images = [blank(tmp_path, f"{i}.jpg", 96, 64) for i in range(3)]
    anns = [
        {"id": i + 1, "image_id": img["id"], "category_id": 3, "bbox": [60, 10, 30, 40]}
        for i, img in enumerate(images)
    ]
    cset = load_coco(write_set(tmp_path, images, anns))
    augment = build_augmentation(
        AugmentConfig(hflip=1.0, scale=1.0, crop=1.0, brightness_contrast=1.0, blur=1.0)
    )
    dataset = DetectionDataset(cset, augment, seed=3)
    first = [dataset[i] for i in range(3)]
    again = [dataset[i] for i in range(3)]
    for (img1, t1), (img2, t2) in zip(first, again, strict=True):
        assert torch.equal(img1, img2) and torch.equal(t1["boxes"], t2["boxes"])
        h, w = img1.shape[1:]
        boxes = t1["boxes"]
        assert (
            (boxes[:, 0] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 1] >= 0) & (boxes[:, 3] <= h)
        ).all()
    dataset.epoch = 1
    assert not all(torch.equal(dataset[i][0], first[i][0]) for i in range(3))
    flip_only = DetectionDataset(
        cset, build_augmentation(AugmentConfig(hflip=1.0, brightness_contrast=0))
    )
    _, target = flip_only[0]
    np.testing.assert_allclose(target["boxes"].numpy(), [[6, 10, 36, 50]], atol=1e-3)


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    assert epoch_batches(10, 3, 0, 1) == epoch_batches(10, 3, 0, 1)
    assert epoch_batches(10, 3, 0, 1) != epoch_batches(10, 3, 0, 2)
    assert sorted(i for b in epoch_batches(10, 3, 0, 1) for i in b) == list(range(10))
