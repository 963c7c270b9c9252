"""Time spent inside a method (synchronising CUDA so the number is real)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


class MethodTimer:
    """Accumulates wall time of method-owned work, per named section."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextmanager
    def section(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
