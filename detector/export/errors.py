"""Errors of ``detector export``."""

from __future__ import annotations

from typing import Any


class ExportError(RuntimeError):
    """The model cannot be exported as asked (bad options, unreadable checkpoint, invalid graph)."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree on real images; nothing was written."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report  # the ParityReport
