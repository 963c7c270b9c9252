"""Shared fixtures for the DiT tests: cached tiny pipelines/transformers and run helpers (CPU, no downloads)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import mmeff.hosts.dit  # noqa: F401  (registers the DiT adapter)
from mmeff.zoo import tiny_pipelines as tp


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and far faster than 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pipes() -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in cache:
            cache[family] = tp.tiny_pipeline(family)
        return cache[family]
    return get


@pytest.fixture(scope="session")
def transformers() -> Callable[[str], torch.nn.Module]:
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = tp.tiny_transformer(family)
        return cache[family]
    return get


def generate(pipe: Any, family: str, **kw: Any) -> torch.Tensor:
    """Run the tiny pipeline deterministically; returns the output array as a tensor."""
    with torch.no_grad():
        return tp.image_of(pipe(**tp.call_kwargs(family, **kw)))


def transformer_inputs(family: str, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Deterministic inputs for a direct call of ``tiny_transformer(family)``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 500.0)
    if family in ("sd3", "sd3_qknorm"):
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 10, 32),
                "pooled_projections": r(batch, 64), "timestep": t}
    if family == "flux":
        ids = torch.zeros(16, 3)
        ids[:, 1] = torch.arange(4).repeat_interleave(4)
        ids[:, 2] = torch.arange(4).repeat(4)
        return {"hidden_states": r(batch, 16, 4), "encoder_hidden_states": r(batch, 6, 32),
                "pooled_projections": r(batch, 32), "timestep": t / 1000, "img_ids": ids,
                "txt_ids": torch.zeros(6, 3)}
    if family == "pixart":
        return {"hidden_states": r(batch, 4, 8, 8), "encoder_hidden_states": r(batch, 6, 32), "timestep": t,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if family == "wan":
        return {"hidden_states": r(batch, 16, 2, 4, 4), "encoder_hidden_states": r(batch, 6, 32), "timestep": t}
    if family == "hunyuan_video":
        mask = torch.ones(batch, 6, dtype=torch.bool)
        mask[:, 4:] = False
        return {"hidden_states": r(batch, 4, 3, 4, 4), "encoder_hidden_states": r(batch, 6, 16),
                "encoder_attention_mask": mask, "pooled_projections": r(batch, 8), "timestep": t,
                "guidance": torch.full((batch,), 3000.0)}
    if family == "cogvideox":
        return {"hidden_states": r(batch, 2, 4, 8, 8), "encoder_hidden_states": r(batch, 16, 32),
                "timestep": t.long()}
    raise KeyError(family)


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]
