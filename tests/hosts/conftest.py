"""Tiny random VLMs shared by the host-adapter tests (built from configs; nothing downloaded)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from mmeff.core.registry import register_method
from mmeff.pruners.base import PrunerConfig, ScoreView
from mmeff.zoo import tiny_models as tm

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


def build(family: str, attn: str = "sdpa", layers: int = 4):
    if family == "llava":
        return tm.tiny_llava(attn, layers)
    if family == "llava_next":
        return tm.tiny_llava_next(attn, layers)
    return tm.tiny_qwen2_vl(attn, layers, v25=family == "qwen2_5_vl")


_CACHE: dict = {}


@pytest.fixture
def vlm():
    """vlm(family, attn) -> cached tiny model (no handle attached)."""
    def get(family: str, attn: str = "sdpa"):
        key = (family, attn)
        if key not in _CACHE:
            _CACHE[key] = build(family, attn)
        return _CACHE[key]
    return get


PROMPTS = [([2, 5, 6], [7, 8, 9]), ([2, 5], [7, 8, 9, 10, 11, 12]), ([2, 9, 9, 4, 3], [7])]


def inputs_for(model, n: int = 1, padding: str = "left", sizes=None):
    kw = {}
    if type(model).__name__ == "LlavaNextForConditionalGeneration":
        kw["image_sizes"] = sizes or [(32, 32), (32, 64), (64, 32)][:n]
    return tm.make_inputs(model, PROMPTS[:n], padding=padding, **kw)


def generate(model, inputs, n=6, **kw):
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def n_hooks(model) -> int:
    """Hooks installed by mmeff (transformers installs its own output-capturing hooks)."""
    def ours(fn) -> bool:
        return getattr(fn, "__module__", "").startswith("mmeff")
    return sum(sum(ours(f) for f in list(m._forward_pre_hooks.values()) + list(m._forward_hooks.values()))
               for m in model.modules())


@register_method
@dataclasses.dataclass(frozen=True)
class FixedKeepLLM(PrunerConfig):
    """Test pruner: keeps the listed sample-local visual indices (a frozen decision) inside the LLM."""

    name: ClassVar[str] = "test_fixed_llm"
    indices: tuple[int, ...] = ()

    def score(self, view: ScoreView) -> torch.Tensor:
        s = torch.zeros(view.n_visual)
        s[list(self.indices)] = 1.0
        return s


@register_method
@dataclasses.dataclass(frozen=True)
class FixedKeepPre(FixedKeepLLM):
    name: ClassVar[str] = "test_fixed_pre"
    stage: ClassVar[str] = "pre_llm"


CHAIN_SEEN: list = []  # (cut, sample, carried original indices, spans) per score() call of the chain pruners


@register_method
@dataclasses.dataclass(frozen=True)
class ChainLLM(PrunerConfig):
    """Test pruner with a chain of in-LLM cuts: keeps ``fractions`` of each image after each of ``cuts``.

    The score depends on the cut (attention of the stage's last query plus a carried per-token value), so a
    wrong coordinate system after a cut changes the decision; ``view.carry["orig"]`` follows the tokens.
    """

    name: ClassVar[str] = "test_chain_llm"
    cuts: tuple[int, ...] = (1, 2, 3)
    fractions: tuple[float, ...] = (0.6, 0.4, 0.2)

    def plan_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        return self.cuts

    def keep_schedule(self, n_visual: int, n_layers: int, layers: tuple[int, ...], family: str = "") -> list[int]:
        return [int(f * n_visual + 1e-9) for f in self.fractions]

    def score(self, view: ScoreView) -> torch.Tensor:
        if "orig" not in view.carry:
            view.carry["orig"] = torch.arange(view.n_visual, dtype=torch.float32)
        carried = view.carry["orig"].to(torch.float32).cpu()
        CHAIN_SEEN.append((view.cut, view.sample, carried.long().tolist(), list(view.spans)))
        order = carried if view.cut % 2 else -carried
        if view.layer == 0:
            return order
        return order / (1 + carried.numel()) + view.last_query_attention().float().mean(0).cpu()


@register_method
@dataclasses.dataclass(frozen=True)
class ChainPre(ChainLLM):
    name: ClassVar[str] = "test_chain_pre"
    stage: ClassVar[str] = "pre_llm"
    cuts: tuple[int, ...] = (0, 2, 3)
