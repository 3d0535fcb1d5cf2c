"""Progress for long runtime jobs: tqdm when it is installed, else a plain counter on stderr.

The vehicle install has no tqdm (numpy, OpenCV and onnxruntime only), so it is imported only
if present.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Counter:
    """``desc: 40/200 unit`` lines on stderr, at most one every ``every`` seconds, and at the end."""

    def __init__(
        self, total: int | None, desc: str, unit: str, every: float = 5.0, enabled: bool = True
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.enabled = enabled
        self.done = 0
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self._last >= self.every:
            self._print()

    def _print(self) -> None:
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.done}{of} {self.unit}", file=sys.stderr, flush=True)
        self._last = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._print()

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str, enabled: bool = True) -> Any:
    """A context manager with ``update(n)``: a tqdm bar, or :class:`Counter` without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return Counter(total, desc, unit, enabled=enabled)
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True)
