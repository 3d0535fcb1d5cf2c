import os
import shutil

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from detector import model as model_mod
from detector.config import ModelConfig
from detector.model import WeightsError, build_model, load_checkpoint, save_checkpoint

ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"
MBV2_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, and no download attempt."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DETECTOR_OFFLINE", "1")
    directory = tmp_path / "torch/hub/checkpoints"
    directory.mkdir(parents=True)
    return directory


def test_offline_coco_weights_say_which_file_and_where(hub):
    with pytest.raises(WeightsError) as err:
        build_model(ModelConfig(arch="fasterrcnn_resnet50_fpn", weights="coco"), ["deer"])
    message = str(err.value)
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in message
    assert str(hub / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth") in message
    assert "https://download.pytorch.org/models/" in message


def test_coco_weights_load_from_the_hub_cache(hub, monkeypatch):
    """The real path: weights enum -> file in $TORCH_HOME/hub/checkpoints -> 91 classes -> new head."""
    torch.manual_seed(1)
    coco_like, _ = build_model(
        ModelConfig(arch=ARCH, weights="none", freeze_backbone=True), ["x"] * 90
    )
    name = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    torch.save(coco_like.state_dict(), hub / name)
    with pytest.raises(WeightsError, match="sha256"):  # our stand-in is not torchvision's file
        build_model(ModelConfig(arch=ARCH, weights="coco"), ["deer"])
    monkeypatch.setattr(model_mod, "check_hub_hash", lambda path: None)
    model, info = build_model(ModelConfig(arch=ARCH, weights="coco"), ["deer", "sign"])
    assert info.predictor_replaced and info.weights_source.startswith("coco:")
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    expected = coco_like.backbone.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.rpn.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"model": Payload()}, hostile)
    with pytest.raises(WeightsError, match="refused"):
        build_model(ModelConfig(arch=ARCH, weights=str(hostile)), ["deer"])
    with pytest.raises(WeightsError, match="refused"):
        load_checkpoint(hostile)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    truncated = tmp_path / "half.pt"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(WeightsError, match="half.pt"):
        build_model(ModelConfig(arch=ARCH, weights=str(truncated)), ["deer"])
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3)}, foreign)
    with pytest.raises(WeightsError, match="not a Faster R-CNN"):
        build_model(ModelConfig(arch=ARCH, weights=str(foreign)), ["deer"])


def _pipeline_checkpoint(tmp_path, class_names):
    model, _ = build_model(ModelConfig(arch=ARCH, weights="none"), class_names)
    for p in model.parameters():  # make weights distinguishable from a fresh init
        p.data.add_(0.01)
    path = tmp_path / "earlier.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "arch": ARCH,
            "class_names": class_names,
            "category_ids": list(range(1, len(class_names) + 1)),
            "config": {},
        },
    )
    return model, path


def test_own_checkpoint_with_other_classes_gets_a_new_predictor(tmp_path):
    earlier, path = _pipeline_checkpoint(tmp_path, ["car", "person"])
    model, info = build_model(ModelConfig(arch=ARCH, weights=str(path)), ["deer"])
    assert info.predictor_replaced and info.start_checkpoint_classes == ["car", "person"]
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    before = earlier.state_dict()
    for prefix in ("backbone.", "rpn.", "roi_heads.box_head."):
        keys = [k for k in model.state_dict() if k.startswith(prefix)]
        assert keys
        for key in keys:
            assert torch.equal(model.state_dict()[key], before[key]), key
    same, info = build_model(ModelConfig(arch=ARCH, weights=str(path)), ["car", "person"])
    assert not info.predictor_replaced
    assert torch.equal(
        same.roi_heads.box_predictor.cls_score.weight,
        before["roi_heads.box_predictor.cls_score.weight"],
    )
    with pytest.raises(WeightsError, match="model.arch=fasterrcnn_mobilenet_v3_large_320_fpn"):
        build_model(
            ModelConfig(arch="fasterrcnn_mobilenet_v3_large_fpn", weights=str(path)), ["deer"]
        )


def test_mobilenet_v2_fpn_loads_the_imagenet_file_strictly(hub, shared_weights):
    source = shared_weights / MBV2_FILE
    cfg = ModelConfig(
        arch="fasterrcnn_mobilenet_v2_fpn", weights="none", weights_backbone="imagenet"
    )
    with pytest.raises(WeightsError, match=str(hub / MBV2_FILE).replace("/", ".")):
        build_model(cfg, ["deer"])
    shutil.copy(source, hub / MBV2_FILE)
    model, info = build_model(cfg, ["deer"])
    assert info.weights_source.startswith("imagenet:")
    state = torch.load(source, weights_only=True)
    body = model.backbone.body.state_dict()
    loaded = 0
    for key, value in state.items():
        if key.startswith("features.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(body[key[len("features.") :]], value), key
            loaded += 1
    assert loaded == len([k for k in body if not k.endswith("num_batches_tracked")])
    explicit = ModelConfig(
        arch="fasterrcnn_mobilenet_v2_fpn", weights="none", weights_backbone=str(source)
    )
    model2, _ = build_model(explicit, ["deer"])
    assert torch.equal(
        model2.backbone.body.state_dict()["0.0.weight"], state["features.0.0.weight"]
    )


def test_mobilenet_v2_file_with_wrong_hash_is_refused(hub, shared_weights):
    data = bytearray((shared_weights / MBV2_FILE).read_bytes())
    data[-100] ^= 0xFF  # one flipped byte
    (hub / MBV2_FILE).write_bytes(bytes(data))
    cfg = ModelConfig(
        arch="fasterrcnn_mobilenet_v2_fpn", weights="none", weights_backbone="imagenet"
    )
    with pytest.raises(WeightsError, match="does not match the b0353104"):
        build_model(cfg, ["deer"])


def test_coco_weights_do_not_exist_for_mobilenet_v2(hub):
    with pytest.raises(WeightsError, match="no COCO detector weights"):
        build_model(ModelConfig(arch="fasterrcnn_mobilenet_v2_fpn", weights="coco"), ["deer"])


def test_unfreeze_last_blocks():
    model, _ = build_model(ModelConfig(arch="fasterrcnn_resnet50_fpn", weights="none"), ["deer"])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    params = model_mod.unfreeze_last_blocks(model, 1)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("body.layer4.", "fpn.")) for n in trainable)
    assert len(params) == len(trainable)
    model, _ = build_model(ModelConfig(arch="fasterrcnn_resnet50_fpn", weights="none"), ["deer"])
    model_mod.unfreeze_last_blocks(model, 0)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fpn.") for n in trainable)


def test_inference_proposal_counts_follow_the_config_into_the_checkpoint_model():
    cfg = ModelConfig(
        arch="fasterrcnn_mobilenet_v2_fpn",
        weights="none",
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=50,
    )
    model, _ = build_model(cfg, ["deer"])
    assert model.rpn._pre_nms_top_n["testing"] == 200 and model.rpn._post_nms_top_n["testing"] == 50
    assert model.rpn._post_nms_top_n["training"] == 2000  # training keeps torchvision's sampling
    checkpoint = {
        "model": model.state_dict(),
        "arch": cfg.arch,
        "class_names": ["deer"],
        "config": {"model": {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50}},
    }
    rebuilt = model_mod.model_from_checkpoint(checkpoint)
    assert rebuilt.rpn._post_nms_top_n["testing"] == 50
    with torch.no_grad():
        proposals, _ = rebuilt.rpn(*_rpn_inputs(rebuilt))
    assert len(proposals[0]) <= 50
    default, _ = build_model(
        ModelConfig(arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none"), ["deer"]
    )
    assert default.rpn._post_nms_top_n["testing"] == 150  # null keeps the arch default


def _rpn_inputs(model):
    images, _ = model.transform([torch.rand(3, 120, 160)])
    return images, model.backbone(images.tensors)


def test_fused_frozen_batchnorm_matches_torchvision_frozen_batchnorm():
    torch.manual_seed(0)
    reference = FrozenBatchNorm2d(8)
    for name in ("weight", "bias", "running_mean"):
        getattr(reference, name).copy_(torch.randn(8))
    reference.running_var.copy_(torch.rand(8) + 0.1)
    fused = model_mod.FusedFrozenBatchNorm2d(8)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(fused(x), reference(x))
