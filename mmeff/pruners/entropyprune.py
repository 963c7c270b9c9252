"""EntropyPrune (arXiv 2602.17196): keep the visual tokens whose query matrices carry most entropy.

Pruning happens once, before the Entropy Collapse Layer K, scoring every visual token by the
matrix entropy of its post-RoPE query states at layer K-1 (no attention map, text-agnostic).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch

from ..core.config import require
from ..core.registry import register_method
from .base import PrunerConfig, ScoreView
from .entropy_math import token_matrix_entropy

# Per-model K from the official scripts: LLaVA-1.5/NeXT K=2, Qwen2.5-VL K=1 (Qwen2-VL: same as 2.5).
DEFAULT_LAYER = {"llava": 2, "llava_next": 2, "qwen2_vl": 1, "qwen2_5_vl": 1}


@register_method
@dataclasses.dataclass(frozen=True)
class EntropyPrune(PrunerConfig):
    """Options beyond the common pruner ones:

    normalization: "code" (the released code: raw eigenvalues) or "trace" (trace-normalised spectrum).
    dim_scale: head dimension is average-pooled to this size when larger (128 in the paper).
    calibration: a JSON written by ``mmeff calibrate entropyprune``; its ``ecl`` sets K when layer is unset.
    """

    name: ClassVar[str] = "entropyprune"
    needs: ClassVar[frozenset[str]] = frozenset({"query_states"})

    normalization: str = "code"
    dim_scale: int = 128
    calibration: str | None = None

    def validate(self) -> None:
        super().validate()
        require(self.normalization in ("code", "trace"),
                f"entropyprune: normalization must be 'code' or 'trace', got {self.normalization!r}")
        require(self.dim_scale > 0, "entropyprune: dim_scale must be positive")
        if self.calibration is not None:
            require(Path(self.calibration).is_file(),
                    f"entropyprune: calibration file {self.calibration!r} not found; "
                    "create it with `mmeff calibrate entropyprune --model ... --out FILE`")

    def default_layer(self, family: str) -> int:
        if self.calibration is not None:
            data = json.loads(Path(self.calibration).read_text())
            k = int(data["ecl"])
            require(k >= 1, f"entropyprune: calibration file gives ecl={k}; it must be >= 1")
            return k
        return DEFAULT_LAYER.get(family, 2)

    def resolve_layer(self, family: str) -> int:
        k = super().resolve_layer(family)
        require(k >= 1, "entropyprune scores with the queries of layer K-1, so layer must be >= 1")
        return k

    def score(self, view: ScoreView) -> torch.Tensor:
        q = view.query_states()  # [n, H, d]
        return token_matrix_entropy(q, self.normalization, self.dim_scale)  # type: ignore[arg-type]
