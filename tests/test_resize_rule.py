"""The integer resize rule: the exported graph's int64 computation, the plain-Python rule and the
patched eager transform agree for every H, W <= 4096."""

from __future__ import annotations

import io
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detector.model import use_integer_resize
from detector.resize_rule import resized_size

SIDES = 4096
SETTINGS = [(320, 512), (320, 640), (800, 1333)]


class SizeRule(torch.nn.Module):
    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def forward(self, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return resized_size(h, w, self.min_size, self.max_size)


def graph_rule(min_size: int, max_size: int) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    """The rule as torch traces it into an ONNX graph (int64 ops), run by onnxruntime."""
    buffer = io.BytesIO()
    example = (torch.tensor([480]), torch.tensor([640]))
    torch.onnx.export(
        SizeRule(min_size, max_size),
        example,
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["h", "w"],
        output_names=["new_h", "new_w"],
        dynamic_axes={"h": {0: "n"}, "w": {0: "n"}},
    )
    proto = onnx.load_model_from_string(buffer.getvalue())
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]), proto


def float64_rule(h: np.ndarray, w: np.ndarray, min_size: int, max_size: int):
    """torchvision's eager size: floor(side * min(min_size / short, max_size / long)) in float64."""
    scale = np.minimum(min_size / np.minimum(h, w), max_size / np.maximum(h, w))
    return np.floor(h * scale).astype(np.int64), np.floor(w * scale).astype(np.int64)


@pytest.mark.slow
@pytest.mark.parametrize(("min_size", "max_size"), SETTINGS)
def test_graph_rule_equals_integer_rule_for_every_size(min_size, max_size):
    session, proto = graph_rule(min_size, max_size)
    types_used = {
        t.elem_type
        for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
        for t in [v.type.tensor_type]
    }
    assert onnx.TensorProto.DOUBLE not in types_used
    assert not [
        n
        for n in proto.graph.node
        if n.op_type in ("Cast", "Div") and "to" in str(n) and "DOUBLE" in str(n)
    ]
    sides = np.arange(1, SIDES + 1, dtype=np.int64)
    differs_from_float64 = 0
    for start in range(0, SIDES, 512):
        h = np.repeat(sides[start : start + 512], SIDES)
        w = np.tile(sides, len(sides[start : start + 512]))
        rule_h, rule_w = resized_size(h, w, min_size, max_size)
        graph_h, graph_w = session.run(None, {"h": h, "w": w})
        np.testing.assert_array_equal(graph_h, rule_h)
        np.testing.assert_array_equal(graph_w, rule_w)
        # the exact rule: side * target / reference floored, checked without division
        long_binds = min_size * np.maximum(h, w) > max_size * np.minimum(h, w)
        target = np.where(long_binds, max_size, min_size)
        reference = np.where(long_binds, np.maximum(h, w), np.minimum(h, w))
        for side, new in ((h, rule_h), (w, rule_w)):
            assert np.all(new * reference <= side * target)
            assert np.all((new + 1) * reference > side * target)
        # the binding side is exactly its target (float64 gives target - 1 for many sizes)
        bound = np.where(long_binds, np.maximum(rule_h, rule_w), np.minimum(rule_h, rule_w))
        np.testing.assert_array_equal(bound, target)
        f_h, f_w = float64_rule(h, w, min_size, max_size)
        assert np.all(np.abs(f_h - rule_h) <= 1) and np.all(np.abs(f_w - rule_w) <= 1)
        differs_from_float64 += int(((f_h != rule_h) | (f_w != rule_w)).sum())
    # torchvision's float64 size is a pixel short for some sizes: what the rule replaces
    assert differs_from_float64 > 0


def _transform(min_size: int, max_size: int) -> GeneralizedRCNNTransform:
    transform = GeneralizedRCNNTransform(
        min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    use_integer_resize(types.SimpleNamespace(transform=transform))
    return transform.eval()


@pytest.mark.parametrize(("min_size", "max_size"), SETTINGS)
def test_patched_eager_transform_uses_the_rule(min_size, max_size):
    rng = np.random.default_rng(min_size + max_size)
    sizes = [(418, 625), (154, 215), (200, 427), (1080, 1920), (16, 8000 // 4)]
    sizes += [tuple(int(v) for v in rng.integers(16, 1500, 2)) for _ in range(40)]
    transform = _transform(min_size, max_size)
    for h, w in sizes:
        resized, _ = transform.resize(torch.zeros(3, h, w))
        assert tuple(resized.shape[-2:]) == resized_size(h, w, min_size, max_size), (h, w)
    # training: the boxes follow the image
    transform.train()
    target = {"boxes": torch.tensor([[10.0, 20.0, 110.0, 220.0]])}
    resized, target = transform.resize(torch.zeros(3, 418, 625), target)
    new_h, new_w = resized_size(418, 625, min_size, max_size)
    assert tuple(resized.shape[-2:]) == (new_h, new_w)
    expected = torch.tensor(
        [[10 * new_w / 625, 20 * new_h / 418, 110 * new_w / 625, 220 * new_h / 418]]
    )
    torch.testing.assert_close(target["boxes"], expected)


def test_rule_on_python_ints_and_known_sizes():
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(1080, 1920, 800, 1333) == (749, 1333)
    assert resized_size(418, 625, 320, 640) == (320, 478)
    assert resized_size(16, 8000, 64, 128) == (0, 128)  # the runtime refuses such a frame


def test_built_and_loaded_models_resize_with_the_rule(tmp_path):
    from detector.config import config_from_dict
    from detector.model import build_model, load_model, save_checkpoint

    cfg = config_from_dict(
        {"model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"}}
    )
    model, _ = build_model(cfg.model, ["a"])
    path = tmp_path / "m.pt"
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "arch": cfg.model.arch,
            "class_names": ["a"],
            "config": cfg.to_dict(),
            "config_hash": cfg.hash(),
            "epoch": 0,
        },
    )
    loaded, _ = load_model(path)
    for m in (model.eval(), loaded):
        # 154 x 215 at 320/640: torchvision's float64 gives 319 x 446, the rule 320 x 446
        images, _ = m.transform([torch.zeros(3, 154, 215)])
        assert images.image_sizes == [resized_size(154, 215, 320, 640)] == [(320, 446)]
