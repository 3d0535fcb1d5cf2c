"""The frozen-training fast path (train.cache_features) and the data-loading options, CPU, 160 px."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from coco_fixtures import stop_at_call, tiny_config, write_coco128_subset

from detector import train as train_mod
from detector.data import (
    DatasetError,
    DetectionDataset,
    aspect_ratio_groups,
    epoch_batches,
    load_coco,
)
from detector.evaluate import evaluate, predict, same_size_batches
from detector.feature_cache import (
    FeatureCacheError,
    build_feature_cache,
    plan_cache,
    stack_features,
)
from detector.model import build_model, load_checkpoint, load_model
from detector.run_folder import read_metrics_csv
from detector.train import seed_everything, train

NO_AUGMENT = {"hflip": 0.0, "brightness_contrast": 0.0}


@pytest.fixture(scope="module")
def tiny(shared_datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco128_fast")
    train_json = write_coco128_subset(
        shared_datasets, root, count=4, keep_negatives=1, name="train.json"
    )
    ids = [i["id"] for i in json.loads(train_json.read_text())["images"]][:2]
    val_json = write_coco128_subset(shared_datasets, root, image_ids=ids, name="val.json")
    return train_json, val_json


@pytest.fixture(scope="module")
def image_run(tiny, tmp_path_factory):
    """The normal loop, augmentation off: the reference for the cached path."""
    train_json, val_json = tiny
    out = tmp_path_factory.mktemp("image_run")
    return train(
        tiny_config(train_json, val_json, out, augment=NO_AUGMENT, train={"epochs": 1}),
        progress=False,
    )


def test_cached_path_matches_the_image_path_and_gives_the_same_kind_of_checkpoint(
    tiny, image_run, tmp_path
):
    train_json, val_json = tiny
    cfg = tiny_config(
        train_json,
        val_json,
        tmp_path,
        augment=NO_AUGMENT,
        train={"epochs": 1, "cache_features": True},
    )
    cached = train(cfg, progress=False)
    ref = read_metrics_csv(image_run.run_dir / "metrics.csv")[0]
    got = read_metrics_csv(cached.run_dir / "metrics.csv")[0]
    # Same seed, same batches, same RNG draws (the cached path replays the resize draw of
    # GeneralizedRCNNTransform). Not bit-exact: the cache holds fp16 features, each image padded
    # alone instead of to its batch's largest image. The RPN losses agree to 1%; the RoI losses
    # depend on which of many near-tied random-init proposals get sampled: 15% per term, 5% total.
    for key in ("loss_objectness", "loss_rpn_box_reg"):
        assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-2), key
    for key in ("loss_classifier", "loss_box_reg"):
        assert float(got[key]) == pytest.approx(float(ref[key]), rel=0.15), key
    assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=0.05)

    # Same layout as a normal checkpoint: loads, evaluates on images, exports.
    best = load_checkpoint(cached.run_dir / "best.pt")
    reference = load_checkpoint(image_run.run_dir / "best.pt")
    assert set(best) == set(reference)
    assert set(best["model"]) == set(reference["model"])
    model, _ = load_model(cached.run_dir / "best.pt")
    metrics = evaluate(
        model,
        load_coco(val_json, class_names=best["class_names"]),
        torch.device("cpu"),
        grid_images=0,
    )
    assert metrics.num_images == 2
    export = pytest.importorskip("detector.export")
    report = export.export_onnx(cached.run_dir / "best.pt", tmp_path / "cached.onnx", parity=False)
    assert report.path.is_file() and report.size_bytes > 1000


def test_cpu_bf16_autocast_runs_the_heads_in_bf16_and_keeps_float32_weights(
    tiny, image_run, tmp_path, monkeypatch, caplog
):
    """train.amp_cpu on the cached path: heads in bf16 where the CPU has it, a warning where not."""
    train_json, val_json = tiny
    native = train_mod.cpu_has_native_bf16()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # an independent look at the CPU flags
        assert native == bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo.read_text()))
    seen: set[torch.dtype] = set()
    backbone_seen: set[torch.dtype] = set()
    real_build = train_mod.build_model

    def build_and_watch(*args, **kwargs):
        model, info = real_build(*args, **kwargs)
        model.roi_heads.box_head.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        model.backbone.register_forward_hook(lambda m, i, out: backbone_seen.add(out["0"].dtype))
        return model, info

    monkeypatch.setattr(train_mod, "build_model", build_and_watch)
    cfg = tiny_config(
        train_json,
        val_json,
        tmp_path,
        augment=NO_AUGMENT,
        train={"epochs": 1, "cache_features": True, "amp_cpu": True},
    )
    with caplog.at_level(logging.WARNING, logger="detector"):
        run = train(cfg, progress=False)
    if native:  # the heads in training and the backbone in the cache build (evaluation: float32)
        assert torch.bfloat16 in seen and torch.bfloat16 in backbone_seen
    else:
        assert seen == {torch.float32} and backbone_seen == {torch.float32}
        assert any("no native bf16" in r.message for r in caplog.records)
    checkpoint = load_checkpoint(run.run_dir / "best.pt")
    assert {v.dtype for v in checkpoint["model"].values() if v.is_floating_point()} == {
        torch.float32
    }
    # bf16 keeps 8 bits of mantissa: the epoch's losses stay close to the float32 run's.
    ref = read_metrics_csv(image_run.run_dir / "metrics.csv")[0]
    got = read_metrics_csv(run.run_dir / "metrics.csv")[0]
    assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=0.1)


@pytest.mark.parametrize(
    "device, amp, amp_dtype, amp_cpu, bf16_hardware, expected",
    [
        ("cuda", True, "bfloat16", False, True, torch.bfloat16),
        ("cuda", True, "bfloat16", False, False, torch.float16),  # with a warning and loss scaling
        ("cuda", True, "float16", False, True, torch.float16),
        ("cuda", False, "bfloat16", False, True, None),
        ("cpu", True, "bfloat16", False, True, None),  # amp_cpu is opt-in
        ("cpu", True, "bfloat16", True, True, torch.bfloat16),
        (
            "cpu",
            True,
            "bfloat16",
            True,
            False,
            None,
        ),  # emulated bf16 is slower: float32, with a warning
        ("cpu", False, "bfloat16", True, True, None),
    ],
)
def test_autocast_dtype_per_device_and_hardware(
    tiny, tmp_path, monkeypatch, device, amp, amp_dtype, amp_cpu, bf16_hardware, expected
):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_hardware)
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: bf16_hardware)
    cfg = tiny_config(
        tiny[0], None, tmp_path, train={"amp": amp, "amp_dtype": amp_dtype, "amp_cpu": amp_cpu}
    )
    assert train_mod.autocast_dtype(cfg, torch.device(device)) == expected


def test_views_frozen_rpn_disk_cache_and_bit_identical_resume(tiny, tmp_path, monkeypatch, caplog):
    """Flip + photometric views, frozen RPN (cached proposals), cache on disk, stop and resume."""
    train_json, _ = tiny
    sections = {
        "model": {"freeze_rpn": True},
        "augment": {"hflip": 0.5, "brightness_contrast": 0.5},
        "train": {
            "epochs": 2,
            "cache_features": True,
            "cache_views": 2,
            "cache_dir": str(tmp_path / "cache"),
        },
    }
    cfg = tiny_config(train_json, None, tmp_path / "full", **sections)
    plan, _ = plan_cache(cfg)
    assert plan.views == ["original", "hflip", "photometric0", "photometric1"] and plan.proposals
    seed_everything(cfg.train.seed)
    initial, _ = build_model(
        cfg.model, [c["name"] for c in json.loads(train_json.read_text())["categories"]]
    )
    full = train(cfg, progress=False)
    expected = load_checkpoint(full.run_dir / "last.pt")
    for key, value in initial.state_dict().items():
        if key.startswith(("backbone.", "rpn.")):
            assert torch.equal(expected["model"][key], value), key
    assert not torch.equal(
        expected["model"]["roi_heads.box_head.fc6.weight"],
        initial.state_dict()["roi_heads.box_head.fc6.weight"],
    )
    (folder,) = (tmp_path / "cache").iterdir()
    assert len(list(folder.glob("*.pt"))) == 5 * 4 and (folder / "manifest.json").is_file()

    real_should_stop = stop_at_call(monkeypatch, train_mod, 5)  # the 5th batch: mid epoch 2
    cfg = tiny_config(train_json, None, tmp_path / "parts", **sections)
    with caplog.at_level(logging.INFO, logger="detector"):
        stopped = train(cfg, progress=False)
    assert any("feature cache: reusing" in r.message for r in caplog.records)
    assert stopped.stop_reason == "stopped by test"
    monkeypatch.setattr(train_mod, "_should_stop", real_should_stop)
    train(cfg, resume=stopped.run_dir, progress=False)
    got = load_checkpoint(stopped.run_dir / "last.pt")
    assert got["state"]["step"] == expected["state"]["step"]
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after resume"


def test_cached_batches_are_padded_with_the_backbones_features_of_padding(tiny, tmp_path):
    """A batch of two differently shaped images: the stacked cached maps rebuild what the
    backbone gives the padded image batch, padding included (zeros there would not)."""
    train_json, _ = tiny
    cfg = tiny_config(
        train_json, None, tmp_path, augment=NO_AUGMENT, train={"cache_features": True}
    )
    cset = load_coco(train_json)
    model, _ = build_model(cfg.model, cset.class_names)
    with (
        torch.no_grad()
    ):  # a trained FPN's features of flat padding are not zero; random init's are
        for name, parameter in model.backbone.fpn.named_parameters():
            if name.endswith("bias"):
                parameter.fill_(0.5)
    dataset = DetectionDataset(cset)
    cache = build_feature_cache(
        model, dataset, cfg, plan_cache(cfg)[0], torch.device("cpu"), progress=False
    )
    shapes = {i: cache[i][0].padded_size for i in range(len(cache))}
    first = 0
    second = next(i for i in shapes if shapes[i] != shapes[first])  # the set has both orientations
    model.eval()
    with torch.no_grad():
        images, _ = model.transform([dataset[first][0], dataset[second][0]])
        expected = model.backbone(images.tensors)
    views = [cache[first][0], cache[second][0]]
    padded = stack_features(views, torch.device("cpu"), cache.padding)
    zeros = stack_features(views, torch.device("cpu"))
    for level, want in expected.items():
        assert padded[level].shape == want.shape, level
        padded_error = (padded[level] - want).norm() / want.norm()
        # What is left is the border: each view's maps were computed padded alone.
        assert padded_error < 0.6 * (zeros[level] - want).norm() / want.norm(), level
    # Each view's own region is its cached map, untouched.
    h, w = views[1].features["0"].shape[1:]
    assert torch.equal(padded["0"][1, :, :h, :w], views[1].features["0"].float())


def test_evaluation_batches_only_same_size_images_so_detections_do_not_depend_on_batch_size(
    tiny, tmp_path, shared_weights
):
    train_json, _ = tiny
    cset = load_coco(train_json)
    sizes = [(cset.image_info(i)["width"], cset.image_info(i)["height"]) for i in cset.image_ids]
    assert len(set(sizes)) > 1 and len(sizes) > len(set(sizes))  # mixed sizes, some shared
    batches = same_size_batches(cset, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in b}) == 1 and len(b) <= 4 for b in batches)
    assert max(len(b) for b in batches) > 1
    assert same_size_batches(cset, 1) == [[i] for i in range(len(sizes))]

    # ImageNet MobileNetV2 features + random FPN and heads: scores that differ from box to box.
    cfg = tiny_config(
        train_json,
        None,
        tmp_path,
        model={
            "arch": "fasterrcnn_mobilenet_v2_fpn",
            "weights_backbone": str(shared_weights / "mobilenet_v2-b0353104.pth"),
            "score_threshold": 0.0,
        },
    )
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cset.class_names)
    model.eval()
    small, large = (
        next(i for i, s in enumerate(sizes) if s == size) for size in sorted(set(sizes))[:2]
    )
    dataset = DetectionDataset(cset)
    with torch.inference_mode():  # why: padded next to a larger image, an image's scores move
        alone_scores = model([dataset[small][0]])[0]["scores"]
        mixed_scores = model([dataset[large][0], dataset[small][0]])[1]["scores"]
    assert not torch.allclose(alone_scores[:10], mixed_scores[:10], atol=1e-4)

    alone = predict(model, cset, torch.device("cpu"), batch_size=1, progress=False)
    batched = predict(model, cset, torch.device("cpu"), batch_size=4, progress=False)
    assert len(alone) == len(batched) > 0
    unmatched = list(batched)  # as sets: near-tied boxes may swap places in the output
    for a in alone:
        match = next(
            (
                b
                for b in unmatched
                if (b["image_id"], b["category_id"]) == (a["image_id"], a["category_id"])
                and abs(b["score"] - a["score"]) < 1e-4
                and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) < 1e-2
            ),
            None,
        )
        assert match is not None, f"image {a['image_id']}: {a} has no batched counterpart"
        unmatched.remove(match)


def test_cache_refuses_to_exceed_its_limit(tiny, tmp_path):
    train_json, _ = tiny
    cfg = tiny_config(
        train_json, None, tmp_path, train={"cache_features": True, "cache_max_gb": 1e-5}
    )
    with pytest.raises(
        FeatureCacheError,
        match=r"needs ~0\.\d+ GB .*train\.cache_max_gb=1e-05: raise train\.cache_max_gb",
    ):
        train(cfg, progress=False)


def test_augmentation_the_cache_cannot_hold_falls_back_to_images(tiny, tmp_path, caplog):
    train_json, _ = tiny
    cfg = tiny_config(
        train_json,
        None,
        tmp_path,
        augment={"scale": 0.5},
        train={"epochs": 1, "cache_features": True},
    )
    with caplog.at_level(logging.WARNING, logger="detector"):
        result = train(cfg, progress=False)
    assert result.stop_reason == "completed"
    assert any(
        "not used, training on images" in r.message and "augment.scale" in r.message
        for r in caplog.records
    )


def test_images_in_ram_train_exactly_like_images_from_disk(tiny, image_run, tmp_path):
    train_json, val_json = tiny
    cfg = tiny_config(
        train_json,
        val_json,
        tmp_path,
        augment=NO_AUGMENT,
        data={"cache_images": True},
        train={"epochs": 1},
    )
    result = train(cfg, progress=False)
    got = load_checkpoint(result.run_dir / "last.pt")["model"]
    for key, value in load_checkpoint(image_run.run_dir / "last.pt")["model"].items():
        assert torch.equal(got[key], value), key
    cfg = tiny_config(
        train_json, None, tmp_path, data={"cache_images": True, "cache_images_max_gb": 1e-6}
    )
    with pytest.raises(DatasetError, match="data.cache_images_max_gb"):
        train(cfg, progress=False)


def test_aspect_ratio_batches_are_deterministic_groups_covering_every_image(tiny):
    train_json, _ = tiny
    groups = aspect_ratio_groups(load_coco(train_json), 3)
    assert len(groups) == 5
    groups = [0, 1, 0, 1, 1, 0, 0, 1, 2, 0, 1]
    for epoch in range(3):
        batches = epoch_batches(len(groups), 2, seed=7, epoch=epoch, groups=groups)
        assert batches == epoch_batches(len(groups), 2, seed=7, epoch=epoch, groups=groups)
        assert sorted(i for b in batches for i in b) == list(range(len(groups)))
        assert len(batches) == 6
        full = [b for b in batches if len(b) == 2]
        assert sum(len({groups[i] for i in b}) == 1 for b in full) >= 4  # only leftovers mix
    assert epoch_batches(11, 2, 7, 0, groups) != epoch_batches(11, 2, 7, 1, groups)
