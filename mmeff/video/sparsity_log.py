"""Sparsity per (denoising step, layer), kept by the video methods for reports and sparsity maps.

A few floats per call: means per (step, layer) over every call (CFG branches and repeated generations
fold into the same cell), so the memory is steps x layers whatever the number of calls.
"""
from __future__ import annotations

from collections import defaultdict


class SparsityLog:
    """Running mean of the skipped-attention fraction per (step, layer)."""

    def __init__(self) -> None:
        self._sum: dict[tuple[int, int], float] = defaultdict(float)
        self._n: dict[tuple[int, int], int] = defaultdict(int)

    def add(self, step: int, layer: int, sparsity: float) -> None:
        self._sum[(step, layer)] += float(sparsity)
        self._n[(step, layer)] += 1

    def per_step_layer(self) -> dict[int, dict[int, float]]:
        """``{step: {layer: mean sparsity}}`` for the sparse calls only (dense calls are not logged)."""
        out: dict[int, dict[int, float]] = {}
        for (step, layer) in sorted(self._sum):
            out.setdefault(step, {})[layer] = self._sum[(step, layer)] / self._n[(step, layer)]
        return out
