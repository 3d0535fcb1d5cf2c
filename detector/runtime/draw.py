"""Draw detections on a BGR frame with OpenCV (for ``detector predict`` and quick looks)."""

from __future__ import annotations

import cv2
import numpy as np

from .detector import Detections


def label_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated BGR colour per label."""
    hue = (int(label) * 47) % 180
    hsv = np.uint8([[[hue, 220, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(frame: np.ndarray, detections: Detections, copy: bool = True) -> np.ndarray:
    """Boxes with "name score" captions on (a copy of) an HxWx3 uint8 BGR frame."""
    out = frame.copy() if copy else frame
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    scale = max(0.4, min(h, w) / 900)
    for box, score, label, name in zip(
        detections.boxes, detections.scores, detections.labels, detections.names, strict=True
    ):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = label_color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        caption = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + 2, h - base)
        cv2.rectangle(out, (x1, ty - th - 2), (x1 + tw + 2, ty + base), color, -1)
        cv2.putText(
            out,
            caption,
            (x1 + 1, ty - 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return out
