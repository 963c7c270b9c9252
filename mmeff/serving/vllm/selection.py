"""Choose the kept visual tokens of one image from its features, with the scorers of ``mmeff.pruners``.

vLLM encodes each image on its own and caches the result by the image's hash, so the same image in two
prompts must get the same tokens: here the decision depends on the image alone. Deterministic scorers
therefore choose exactly what ``mmeff.apply`` chooses; stochastic ones (``random``) seed their generator
from the pruner's seed and the image's pixels instead of the prompt (see :func:`image_seed`).
"""
from __future__ import annotations

import dataclasses
import zlib

import torch

from ...core.errors import ConfigError
from ...pruners.base import PrunerConfig


def image_seed(pruner_seed: int, pixels: torch.Tensor) -> int:
    """Generator seed of one image: the pruner's ``seed`` mixed with a CRC-32 of its float32 pixel values."""
    digest = zlib.crc32(pixels.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return (pruner_seed * 1_000_003 + digest) % (2 ** 63)


@dataclasses.dataclass
class ImageFeatureView:
    """The :class:`~mmeff.pruners.base.ScoreView` of one image inside vLLM: its projected features only."""

    feats: torch.Tensor            # [n_visual, D] projected features (what enters the LLM)
    seed: int
    pruner_name: str
    sample: int = 0

    @property
    def n_visual(self) -> int:
        return int(self.feats.shape[0])

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(0, self.n_visual)]

    def features(self) -> torch.Tensor:
        return self.feats

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _llm_only(self, what: str) -> torch.Tensor:
        raise ConfigError(f"{self.pruner_name} asks for {what}, which exists only inside the LLM; "
                          "vLLM serves pre-LLM pruners that score image features")

    def last_query_attention(self) -> torch.Tensor:
        return self._llm_only("last-query attention")

    def query_states(self) -> torch.Tensor:
        return self._llm_only("query states")

    def key_states(self) -> torch.Tensor:
        return self._llm_only("key states")

    def text_rows_attention(self) -> torch.Tensor:
        return self._llm_only("text-row attention")

    def hidden_states(self) -> torch.Tensor:
        return self._llm_only("hidden states")


def kept_indices(pruner: PrunerConfig, feats: torch.Tensor, pixels: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices (into ``feats``' rows) of the ``keep`` tokens ``pruner`` keeps for one image."""
    view = ImageFeatureView(feats, image_seed(getattr(pruner, "seed", 0), pixels), pruner.name)
    return pruner.select(view, [keep]).to(feats.device)


def prune_image(pruner: PrunerConfig, feats: torch.Tensor, pixels: torch.Tensor, keep: int) -> torch.Tensor:
    """The kept rows of one image's features, in their original order (exactly ``keep`` rows)."""
    if keep > feats.shape[0]:
        raise ConfigError(f"{pruner.name}: {keep} placeholders reserved but the image has {feats.shape[0]} tokens")
    return feats[kept_indices(pruner, feats, pixels, keep)]
