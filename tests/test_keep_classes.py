"""model.keep_classes and `detector merge`: new classes added to an earlier detector on its frozen
trunk, the earlier classes' detections bit-identical (PyTorch, CPU), on real images."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from coco_fixtures import stop_at_call, tiny_config, write_coco128_subset

from detector import cli
from detector import train as train_mod
from detector.branches import Branch, BranchRecord, MultiBranchFasterRCNN, NamedLabelsRoIHeads
from detector.config import ConfigError, ModelConfig, config_from_dict
from detector.data import load_coco
from detector.evaluate import evaluate, format_metrics
from detector.model import (
    WeightsError,
    build_model,
    coco_named_classes,
    detection_branches,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from detector.train import train

MAX_SIDE = 192


def _write_set(items, out: Path, name: str, class_name: str) -> Path:
    """COCO JSON + downscaled images from [(image path, [(x1, y1, x2, y2), ...]), ...]."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (path, boxes) in enumerate(items, start=1):
        image = cv2.imread(str(path))
        scale = MAX_SIDE / max(image.shape[:2])
        small = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)))
        cv2.imwrite(str(out / "images" / path.name), small)
        images.append(
            {
                "id": image_id,
                "file_name": path.name,
                "width": small.shape[1],
                "height": small.shape[0],
            }
        )
        for x1, y1, x2, y2 in boxes:
            x, y, w, h = x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": 1, "name": class_name}]
    path = out / name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def raccoon_set(shared: Path, out: Path, first: int, count: int, name: str) -> Path:
    """Raccoon-voc images (Pascal VOC XML), one class."""
    src = shared / "raccoon-voc"
    items = []
    for k in range(first, first + count):
        root = ET.parse(src / "annotations" / f"raccoon-{k}.xml").getroot()
        boxes = [
            tuple(float(o.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
            for o in root.iter("object")
        ]
        items.append((src / "images" / root.find("filename").text, boxes))
    return _write_set(items, out, name, "raccoon")


def deer_set(shared: Path, out: Path, first: int, count: int, name: str) -> Path:
    """deer-automl images (AutoML CSV, normalised corners), one class."""
    src = shared / "deer-automl"
    by_file: dict[str, list] = {}
    with open(src / "labels.csv", newline="") as f:
        for row in csv.reader(f):
            by_file.setdefault(row[1].rsplit("/", 1)[-1], []).append(row)
    items = []
    for file_name in sorted(by_file)[first : first + count]:
        path = src / "images" / file_name
        height, width = cv2.imread(str(path)).shape[:2]
        boxes = [
            (float(r[3]) * width, float(r[4]) * height, float(r[7]) * width, float(r[8]) * height)
            for r in by_file[file_name]
        ]
        items.append((path, boxes))
    return _write_set(items, out, name, "Deer")


@pytest.fixture(scope="module")
def sets(shared_datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("keep_sets")
    base = write_coco128_subset(shared_datasets, root / "base", count=4, name="train.json")
    return {
        "base": base,
        "raccoon": raccoon_set(shared_datasets, root / "raccoon", 1, 4, "train.json"),
        "raccoon_val": raccoon_set(shared_datasets, root / "raccoon", 5, 2, "val.json"),
        "deer": deer_set(shared_datasets, root / "deer", 0, 4, "train.json"),
        "deer_val": deer_set(shared_datasets, root / "deer", 4, 3, "val.json"),
    }


def _train(train_json, val_json, out: Path, model: dict | None = None, **sections):
    cfg = tiny_config(
        train_json, val_json, out, model=model or {}, train={"epochs": 1, **sections.pop("train", {})},
        **sections,
    )  # fmt: skip
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def base_ckpt(sets, tmp_path_factory) -> Path:
    """The earlier detector: a pipeline run on coco128 classes (1 epoch, random init)."""
    result = _train(sets["base"], None, tmp_path_factory.mktemp("base_run"))
    return result.run_dir / "best.pt"


@pytest.fixture(scope="module")
def keep_run(sets, base_ckpt, tmp_path_factory):
    """raccoon added to the base with model.keep_classes (val set: raccoon only)."""
    out = tmp_path_factory.mktemp("keep_run")
    logger = logging.getLogger("detector")
    level = logger.level
    logger.setLevel(logging.INFO)  # train.log gets the INFO lines, as under the CLI
    try:
        return _train(
        sets["raccoon"], sets["raccoon_val"], out,
        model={"weights": str(base_ckpt), "keep_classes": True},
        )  # fmt: skip
    finally:
        logger.setLevel(level)


def real_images(sets) -> list[torch.Tensor]:
    """Every image of the sets (coco128, raccoon, deer), as the model takes them."""
    images = []
    for key in ("base", "raccoon", "raccoon_val", "deer_val"):
        folder = Path(sets[key]).parent / "images"
        for info in json.loads(Path(sets[key]).read_text())["images"]:
            bgr = cv2.imread(str(folder / info["file_name"]))
            rgb = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
            images.append(rgb.float() / 255.0)
    return images


@torch.inference_mode()
def detections(model, images) -> list[dict[str, torch.Tensor]]:
    return [model([image])[0] for image in images]


def assert_earlier_classes_identical(earlier, merged, images, num_earlier: int) -> int:
    """The merged model's detections of labels 1..num_earlier are the earlier model's, bit for
    bit; returns how many detections of later classes the merged model made."""
    later = 0
    for before, after in zip(detections(earlier, images), detections(merged, images), strict=True):
        kept = after["labels"] <= num_earlier
        assert len(before["labels"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(after[key][kept], before[key]), key
        later += int((~kept).sum())
    return later


def test_added_class_keeps_the_earlier_detections_bit_identical(sets, base_ckpt, keep_run):
    base, base_checkpoint = load_model(base_ckpt)
    merged, checkpoint = load_model(keep_run.run_dir / "best.pt")
    assert isinstance(merged, MultiBranchFasterRCNN) and len(merged.branches) == 2
    names = list(base_checkpoint["class_names"])
    assert checkpoint["class_names"] == [*names, "raccoon"]
    assert [b["class_names"] for b in checkpoint["branches"]] == [names, ["raccoon"]]
    assert checkpoint["branches"][0]["source"] == f"file:{base_ckpt}"
    assert checkpoint["branches"][1]["trained"] and not checkpoint["branches"][0]["trained"]
    later = assert_earlier_classes_identical(base, merged, real_images(sets), len(names))
    assert later > 0, "the new branch should detect something"
    # The earlier branch's weights are the earlier model's heads, unchanged.
    state = checkpoint["model"]
    for key, value in base_checkpoint["model"].items():
        where = key if key.startswith("backbone.") else f"branches.0.{key}"
        assert torch.equal(state[where], value), key
    summary = (keep_run.run_dir / "summary.txt").read_text()
    assert "branch 1: " + ", ".join(names) in summary and "branch 2: raccoon" in summary
    assert "branch 2: raccoon" in (keep_run.run_dir / "train.log").read_text()


def test_detection_branches_and_label_offsets(base_ckpt, keep_run):
    base, _ = load_model(base_ckpt)
    assert detection_branches(base) == [(base.rpn, base.roi_heads, 0)]
    merged, checkpoint = load_model(keep_run.run_dir / "best.pt")
    branches = detection_branches(merged)
    earlier = len(checkpoint["branches"][0]["class_names"])
    assert [offset for _, _, offset in branches] == [0, earlier]
    assert branches[-1][1] is merged.roi_heads and branches[-1][0] is merged.rpn
    cap = sum(int(heads.detections_per_img) for _, heads, _ in branches)
    out = detections(merged, [torch.rand(3, 150, 180)])[0]
    assert len(out["scores"]) <= cap
    assert torch.all(out["scores"][:-1] >= out["scores"][1:]), "sorted by score"


def test_checkpoint_round_trip_rebuilds_the_same_model(sets, keep_run, tmp_path):
    model, checkpoint = load_model(keep_run.run_dir / "best.pt")
    again_path = tmp_path / "again.pt"
    save_checkpoint(again_path, {k: v for k, v in checkpoint.items() if k != "format"})
    again, _ = load_model(again_path)
    images = real_images(sets)[:3]
    for a, b in zip(detections(model, images), detections(again, images), strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
    assert again.transform.min_size == model.transform.min_size == (160,)


def test_second_increment_keeps_both_earlier_branches(sets, keep_run, tmp_path):
    first = keep_run.run_dir / "best.pt"
    result = _train(
        sets["deer"], sets["deer_val"], tmp_path,
        model={"weights": str(first), "keep_classes": True},
    )  # fmt: skip
    two, two_checkpoint = load_model(first)
    three, checkpoint = load_model(result.run_dir / "best.pt")
    assert len(three.branches) == 3
    assert checkpoint["class_names"] == [*two_checkpoint["class_names"], "Deer"]
    assert checkpoint["branches"][1]["source"] == f"file:{first}"
    later = assert_earlier_classes_identical(
        two, three, real_images(sets), len(two_checkpoint["class_names"])
    )
    assert later > 0


def test_resumed_keep_classes_run_is_bit_identical(sets, base_ckpt, tmp_path, monkeypatch):
    model = {"weights": str(base_ckpt), "keep_classes": True}
    sections = {"train": {"epochs": 2}}
    full = _train(sets["raccoon"], None, tmp_path / "full", model=model, **sections)
    expected = load_checkpoint(full.run_dir / "last.pt")
    real_should_stop = stop_at_call(monkeypatch, train_mod, 3)  # mid epoch 2
    cfg = tiny_config(sets["raccoon"], None, tmp_path / "parts", model=model, **sections)
    stopped = train(cfg, progress=False)
    assert stopped.stop_reason == "stopped by test"
    monkeypatch.setattr(train_mod, "_should_stop", real_should_stop)
    resumed = train(cfg, resume=stopped.run_dir, progress=False)
    assert resumed.stop_reason == "completed"
    got = load_checkpoint(stopped.run_dir / "last.pt")
    assert got["state"]["step"] == expected["state"]["step"]
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"
    assert got["branches"] == expected["branches"]


def test_feature_cache_trains_the_new_branch(sets, base_ckpt, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="detector")
    result = _train(
        sets["raccoon"], None, tmp_path,
        model={"weights": str(base_ckpt), "keep_classes": True, "freeze_rpn": True},
        train={"cache_features": True, "epochs": 2},
    )  # fmt: skip
    assert "feature cache:" in caplog.text and "not used" not in caplog.text
    base, base_checkpoint = load_model(base_ckpt)
    merged, checkpoint = load_model(result.run_dir / "last.pt")
    state, start = checkpoint["model"], base_checkpoint["model"]
    assert not torch.equal(
        state["branches.1.roi_heads.box_head.fc6.weight"], start["roi_heads.box_head.fc6.weight"]
    ), "the new branch trained"
    for key in start:
        if key.startswith("rpn."):  # frozen RPN: the one the new branch uses did not move
            assert torch.equal(state[f"branches.1.{key}"], start[key]), key
    assert_earlier_classes_identical(
        base, merged, real_images(sets)[:6], len(base_checkpoint["class_names"])
    )


# --------------------------------------------------------------------------------------------
# model.freeze_rpn: the new branch uses the earlier branch's RPN, run once for both
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_rpn_run(sets, base_ckpt, tmp_path_factory):
    """raccoon added to the base with model.keep_classes and model.freeze_rpn."""
    out = tmp_path_factory.mktemp("shared_rpn_run")
    model = {"weights": str(base_ckpt), "keep_classes": True, "freeze_rpn": True}
    return _train(sets["raccoon"], sets["raccoon_val"], out, model=model)


def count_rpn_calls(model) -> list[int]:
    """A per-call counter on every distinct RPN module of ``model``."""
    calls = [0]
    for rpn in {id(b.rpn): b.rpn for b in model.branches}.values():
        rpn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_frozen_rpn_branch_uses_the_earlier_rpn_once_and_detects_as_with_a_copy(
    sets, base_ckpt, shared_rpn_run
):
    base, base_checkpoint = load_model(base_ckpt)
    merged, checkpoint = load_model(shared_rpn_run.run_dir / "best.pt")
    assert [b["rpn_from"] for b in checkpoint["branches"]] == [None, 0]
    assert merged.branches[1].rpn is merged.branches[0].rpn
    images = real_images(sets)
    earlier = len(base_checkpoint["class_names"])
    assert assert_earlier_classes_identical(base, merged, images, earlier) > 0
    calls = count_rpn_calls(merged)
    detections(merged, images[:2])
    assert calls[0] == 2, "one RPN pass per image for both branches"
    # The same branches, each on its own copy of that RPN: the very same detections.
    copies = MultiBranchFasterRCNN(
        merged.transform, merged.backbone,
        [merged.branches[0], Branch(copy.deepcopy(merged.rpn), merged.roi_heads)],
        [merged.records[0], BranchRecord(["raccoon"], None, "copy", trained=True)],
    ).eval()  # fmt: skip
    for a, b in zip(detections(merged, images), detections(copies, images), strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key
    assert "proposals from branch 1's RPN" in (shared_rpn_run.run_dir / "summary.txt").read_text()
    with pytest.raises(ValueError, match="rpn_from=0"):
        MultiBranchFasterRCNN(copies.transform, copies.backbone, list(copies.branches),
                              [copies.records[0], BranchRecord(["x"], None, "x", rpn_from=0)])  # fmt: skip


def test_shared_rpn_trains_in_training_mode_and_a_damaged_file_is_refused(shared_rpn_run, tmp_path):
    merged, checkpoint = load_model(shared_rpn_run.run_dir / "best.pt")
    merged.train()
    assert merged.rpn.training, "training-mode proposal counts for the branch that trains"
    assert not merged.branches[0].roi_heads.training and merged.roi_heads.training
    key = next(k for k in checkpoint["model"] if k.startswith("branches.1.rpn."))
    edited = {k: v for k, v in checkpoint.items() if k != "format"}
    edited["model"] = {**checkpoint["model"], key: checkpoint["model"][key] + 1}
    save_checkpoint(tmp_path / "edited.pt", edited)
    with pytest.raises(WeightsError, match=f"tensor {key} differs"):
        load_model(tmp_path / "edited.pt")
    edited = {k: v for k, v in checkpoint.items() if k != "format"}
    edited["branches"] = [checkpoint["branches"][0], {**checkpoint["branches"][1], "rpn_from": 1}]
    save_checkpoint(tmp_path / "later.pt", edited)
    with pytest.raises(WeightsError, match="branch 2 says it uses the RPN of branch 2"):
        load_model(tmp_path / "later.pt")


def test_frozen_rpn_refuses_other_proposal_counts_and_chains_to_the_first_rpn(
    sets, shared_rpn_run, tmp_path
):
    first = shared_rpn_run.run_dir / "best.pt"
    arch = load_checkpoint(first)["arch"]
    cfg = ModelConfig(arch=arch, weights=str(first), keep_classes=True, freeze_rpn=True,
                      rpn_post_nms_top_n_test=7)  # fmt: skip
    with pytest.raises(
        WeightsError, match="model.rpn_post_nms_top_n_test=7.*earlier detector's RPN"
    ):
        build_model(cfg, ["Deer"])
    model = {"weights": str(first), "keep_classes": True, "freeze_rpn": True}
    result = _train(sets["deer"], None, tmp_path, model=model)
    three, checkpoint = load_model(result.run_dir / "best.pt")
    assert [b["rpn_from"] for b in checkpoint["branches"]] == [None, 0, 0]
    assert three.branches[2].rpn is three.branches[0].rpn
    two, two_checkpoint = load_model(first)
    earlier = len(two_checkpoint["class_names"])
    assert_earlier_classes_identical(two, three, real_images(sets)[:6], earlier)


def test_config_refuses_to_train_any_of_the_shared_trunk(base_ckpt):
    model = {"weights": str(base_ckpt), "keep_classes": True}
    with pytest.raises(ConfigError, match="train.unfreeze.epochs"):
        config_from_dict({"model": model, "train": {"unfreeze": {"epochs": 2}}})
    with pytest.raises(ConfigError, match="model.freeze_backbone"):
        config_from_dict({"model": {**model, "freeze_backbone": False}})
    with pytest.raises(ConfigError, match="model.weights"):
        config_from_dict({"model": {**model, "weights": "none"}})
    assert config_from_dict({"model": model}).model.keep_classes


def test_build_refuses_known_classes_other_resize_and_bare_state_dicts(base_ckpt, tmp_path):
    checkpoint = load_checkpoint(base_ckpt)
    arch = checkpoint["arch"]
    cfg = ModelConfig(arch=arch, weights=str(base_ckpt), keep_classes=True, min_size=160)
    with pytest.raises(WeightsError, match=checkpoint["class_names"][0]):
        build_model(cfg, [checkpoint["class_names"][0], "raccoon"])
    with pytest.raises(WeightsError, match="model.min_size=320"):
        build_model(
            ModelConfig(arch=arch, weights=str(base_ckpt), keep_classes=True, min_size=320), ["x"]
        )
    bare = tmp_path / "bare.pt"
    torch.save(checkpoint["model"], bare)
    with pytest.raises(WeightsError, match="bare state_dict"):
        build_model(ModelConfig(arch=arch, weights=str(bare), keep_classes=True), ["raccoon"])
    model, info = build_model(cfg, ["raccoon"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("branches.1.") for n in trainable)
    assert info.start_checkpoint_classes == checkpoint["class_names"]


def test_coco_class_list_has_the_80_named_classes():
    names, labels = coco_named_classes()
    assert len(names) == 80 and "N/A" not in names and "__background__" not in names
    assert names[0] == "person" and labels[0] == 1 and labels[-1] == 90
    assert names[-1] == "toothbrush" and len(set(labels)) == 80


def test_named_labels_heads_keep_torchvision_boxes_and_scores_of_named_classes():
    """COCO's predictor has N/A rows: dropping them after torchvision's post-processing keeps
    every named-class detection bit-identical (random 91-row model; no COCO file offline)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="fasterrcnn_mobilenet_v3_large_320_fpn",
        weights="none",
        min_size=160,
        score_threshold=0.0,
    )
    model, _ = build_model(cfg, [f"c{i}" for i in range(90)])
    _, labels = coco_named_classes()
    bias = model.roi_heads.box_predictor.cls_score.bias
    with torch.no_grad():  # scores spread over named and N/A rows alike
        bias.zero_()
        bias[[1, 12, 44, 45]] = 1.0  # person, N/A, bottle, N/A
    model.eval()
    image = [torch.rand(3, 160, 200)]
    with torch.inference_mode():
        plain = model(image)[0]
        model.roi_heads = NamedLabelsRoIHeads.from_heads(model.roi_heads, labels)
        named = model(image)[0]
    kept = torch.isin(plain["labels"], torch.tensor(labels))
    assert (~kept).any() and kept.any(), "detections of N/A rows to drop and named ones to keep"
    assert torch.equal(named["boxes"], plain["boxes"][kept])
    assert torch.equal(named["scores"], plain["scores"][kept])
    remap = {label: k + 1 for k, label in enumerate(labels)}
    assert named["labels"].tolist() == [remap[int(v)] for v in plain["labels"][kept]]


def test_coco_keep_classes_offline_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DETECTOR_OFFLINE", "1")
    cfg = ModelConfig(
        arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights="coco", keep_classes=True
    )
    with pytest.raises(WeightsError, match="not in the torch hub cache"):
        build_model(cfg, ["Deer"])


# --------------------------------------------------------------------------------------------
# detector merge
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replace_run(sets, base_ckpt, tmp_path_factory):
    """Today's path from the base: its predictor replaced by a raccoon one, trunk frozen."""
    out = tmp_path_factory.mktemp("replace_run")
    return _train(sets["raccoon"], None, out, model={"weights": str(base_ckpt)})


def test_merge_gives_one_model_with_both_detectors_detections(
    sets, base_ckpt, replace_run, tmp_path
):
    new = replace_run.run_dir / "best.pt"
    out = tmp_path / "all.pt"
    assert cli.main(["merge", str(base_ckpt), str(new), "--out", str(out)]) == 0
    base, base_checkpoint = load_model(base_ckpt)
    other, _ = load_model(new)
    merged, checkpoint = load_model(out)
    earlier = len(base_checkpoint["class_names"])
    assert checkpoint["class_names"] == [*base_checkpoint["class_names"], "raccoon"]
    images = real_images(sets)
    assert_earlier_classes_identical(base, merged, images, earlier)
    for alone, together in zip(detections(other, images), detections(merged, images), strict=True):
        mine = together["labels"] > earlier
        assert torch.equal(together["boxes"][mine], alone["boxes"])
        assert torch.equal(together["scores"][mine], alone["scores"])
        assert torch.equal(together["labels"][mine], alone["labels"] + earlier)
    # never over an existing file without --overwrite
    assert cli.main(["merge", str(base_ckpt), str(new), "--out", str(out)]) == 2
    assert cli.main(["merge", str(base_ckpt), str(new), "--out", str(out), "--overwrite"]) == 0
    assert [b["rpn_from"] for b in checkpoint["branches"]] == [None, None], "its RPN trained"


def test_merge_runs_a_bit_identical_rpn_once(sets, base_ckpt, tmp_path):
    """A replace-the-predictor run with model.freeze_rpn kept the base's RPN bit for bit: the
    merged model runs it once, and detects what the two models detect."""
    frozen = _train(sets["raccoon"], None, tmp_path / "run",
                    model={"weights": str(base_ckpt), "freeze_rpn": True})  # fmt: skip
    out = tmp_path / "all.pt"
    assert (
        cli.main(["merge", str(base_ckpt), str(frozen.run_dir / "best.pt"), "--out", str(out)]) == 0
    )
    merged, checkpoint = load_model(out)
    assert [b["rpn_from"] for b in checkpoint["branches"]] == [None, 0]
    assert merged.branches[1].rpn is merged.branches[0].rpn
    base, base_checkpoint = load_model(base_ckpt)
    other, _ = load_model(frozen.run_dir / "best.pt")
    images = real_images(sets)[:6]
    earlier = len(base_checkpoint["class_names"])
    assert_earlier_classes_identical(base, merged, images, earlier)
    for alone, together in zip(detections(other, images), detections(merged, images), strict=True):
        mine = together["labels"] > earlier
        assert torch.equal(together["boxes"][mine], alone["boxes"])
        assert torch.equal(together["scores"][mine], alone["scores"])


def test_merge_refuses_different_trunks_naming_the_tensor(base_ckpt, replace_run, tmp_path, capsys):
    checkpoint = load_checkpoint(replace_run.run_dir / "best.pt")
    key = sorted(k for k in checkpoint["model"] if k.startswith("backbone.fpn."))[0]
    checkpoint["model"][key] = checkpoint["model"][key] + 1e-6
    changed = tmp_path / "changed.pt"
    save_checkpoint(changed, {k: v for k, v in checkpoint.items() if k != "format"})
    out = tmp_path / "all.pt"
    assert cli.main(["merge", str(base_ckpt), str(changed), "--out", str(out)]) == 2
    assert key in capsys.readouterr().err and not out.exists()
    checkpoint = load_checkpoint(replace_run.run_dir / "best.pt")
    checkpoint["config"]["model"]["min_size"] = 200
    resized = tmp_path / "resized.pt"
    save_checkpoint(resized, {k: v for k, v in checkpoint.items() if k != "format"})
    assert cli.main(["merge", str(base_ckpt), str(resized), "--out", str(out)]) == 2
    assert "min_size" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------------------------
# evaluate on a set with only some of the model's classes
# --------------------------------------------------------------------------------------------


def test_evaluate_on_a_deer_only_set_scores_deer_and_lists_the_absent_classes(
    sets, keep_run, tmp_path
):
    result = _train(
        sets["deer"], sets["deer_val"], tmp_path,
        model={"weights": str(keep_run.run_dir / "best.pt"), "keep_classes": True},
    )  # fmt: skip
    model, checkpoint = load_model(result.run_dir / "best.pt")
    cset = load_coco(sets["deer_val"], class_names=checkpoint["class_names"])
    metrics = evaluate(model, cset, torch.device("cpu"), grid_images=0)
    assert list(metrics.per_class_ap) == ["Deer"]
    assert metrics.absent_classes == checkpoint["class_names"][:-1]
    text = format_metrics(metrics)
    assert "Deer" in text and "not in this set" in text and "raccoon" in text.split("not in")[1]


# --------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_keep_classes_run_keeps_the_earlier_branch(sets, base_ckpt, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    values = tiny_config(
        sets["raccoon"], None, tmp_path / "runs",
        model={"weights": str(base_ckpt), "keep_classes": True},
        train={"epochs": 1, "device": "cpu"},
    ).to_dict()  # fmt: skip
    values["train"]["name"] = "ddp"
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "detector", "train", str(config),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: 2 processes (gloo)" in proc.stderr
    assert "branch 2: raccoon" in proc.stdout  # the summary, printed once by rank 0
    last = load_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")
    start = load_checkpoint(base_ckpt)["model"]
    assert last["class_names"][-1] == "raccoon" and len(last["branches"]) == 2
    for key, value in start.items():
        where = key if key.startswith("backbone.") else f"branches.0.{key}"
        assert torch.equal(last["model"][where], value), key
    assert not torch.equal(
        last["model"]["branches.1.roi_heads.box_head.fc6.weight"],
        start["roi_heads.box_head.fc6.weight"],
    )


# --------------------------------------------------------------------------------------------
# ONNX export + runtime of a merged model (needs the detector.export package)
# --------------------------------------------------------------------------------------------


def _has_export_package() -> bool:
    try:
        return importlib.util.find_spec("detector.export.writing") is not None
    except ModuleNotFoundError:  # detector.export is a module, not the package
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_export_package(), reason="needs the detector.export package")
@pytest.mark.parametrize("batch", [1, 2])
def test_merged_model_exports_and_keeps_earlier_detections_within_parity(
    sets, base_ckpt, keep_run, tmp_path, batch
):
    import onnxruntime as ort

    from detector.export import parity, writing

    base, base_checkpoint = load_model(base_ckpt)
    merged, checkpoint = load_model(keep_run.run_dir / "best.pt")
    folder = Path(sets["raccoon_val"]).parent / "images"
    frames = [cv2.imread(str(p)) for p in sorted(folder.iterdir())[:2]]
    outputs = {}
    for name, model, ckpt in (("base", base, base_checkpoint), ("merged", merged, checkpoint)):
        out = tmp_path / f"{name}.onnx"
        # The export's own parity check (PyTorch vs ORT of one model) must pass: on its flat
        # gray frame the barely trained branches score hundreds of boxes alike and NMS among
        # the ties keeps other boxes and counts (recognised as tie swaps / tie count
        # differences). Checked below: the merged graph's earlier-class rows against the
        # earlier model's graph.
        report = writing.export_model(
            model, out, class_names=list(ckpt["class_names"]), batch=batch, parity=True
        )
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs[name] = [session.run(None, {"images": np.stack([f] * batch)}) for f in frames]
    assert json.loads(report.metadata["class_names"]) == checkpoint["class_names"]
    earlier = len(base_checkpoint["class_names"])
    later = 0
    for (b_boxes, b_scores, b_labels, b_counts), (boxes, scores, labels, counts) in zip(
        outputs["base"], outputs["merged"], strict=True
    ):
        for i in range(batch):
            n, m = int(b_counts[i]), int(counts[i])
            mine = labels[i, :m] <= earlier
            assert mine.sum() == n
            np.testing.assert_array_equal(labels[i, :m][mine], b_labels[i, :n])
            np.testing.assert_allclose(
                boxes[i, :m][mine], b_boxes[i, :n], atol=parity.BOX_TOLERANCE
            )
            np.testing.assert_allclose(
                scores[i, :m][mine], b_scores[i, :n], atol=parity.SCORE_TOLERANCE
            )
            later += int((~mine).sum())
    assert later > 0


@pytest.mark.slow
def test_shared_rpn_model_exports_the_rpn_once(sets, base_ckpt, shared_rpn_run, tmp_path):
    import onnx

    from detector.export import writing

    convs = {}
    for name, path in (("base", base_ckpt), ("merged", shared_rpn_run.run_dir / "best.pt")):
        model, checkpoint = load_model(path)
        out = tmp_path / f"{name}.onnx"
        writing.export_model(model, out, class_names=list(checkpoint["class_names"]), parity=True)
        graph = onnx.load(str(out)).graph
        convs[name] = sum(node.op_type == "Conv" for node in graph.node)
    # RoI heads have no convolution here: one more RPN would add its head's three.
    assert convs["merged"] == convs["base"] > 0
