"""DiT host adapter: sites and layout, the generic dit_attention path, step index, undo, errors."""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, ClassVar

import pytest
import torch

import mmeff
from mmeff import AlreadyAppliedError, ConfigError, UnsupportedModelError
from mmeff.core.config import MethodConfig
from mmeff.hosts.dit import describe
from mmeff.hosts.dit_context import AttentionRuntime
from mmeff.hosts.dit_steps import StepTracker
from mmeff.zoo import tiny_pipelines as tp

from .conftest import forward, generate, transformer_inputs


# ---------------------------------------------------------------------------------------------- test methods
@dataclasses.dataclass(frozen=True)
class Dense(MethodConfig):
    """Pass-through: the stateless ``attention`` form of a dit_attention method."""

    name: ClassVar[str] = "test_dense"
    kind: ClassVar[str] = "dit_attention"

    def attention(self, ctx, q, k, v, attn_mask, scale):
        return ctx.attend(q, k, v, attn_mask, scale)


class _Recorder(AttentionRuntime):
    def __init__(self, tag: str, log: list | None, zero_layer: int | None) -> None:
        self.tag, self.log, self.zero_layer, self.records = tag, log, zero_layer, []

    def __call__(self, ctx, q, k, v, attn_mask, scale):
        self.records.append({"site": ctx.site.name, "layer": ctx.layer, "step": ctx.step,
                             "num_steps": ctx.num_steps, "grid": ctx.grid, "text": ctx.text, "image": ctx.image,
                             "seq": int(q.shape[-2]), "batch": int(q.shape[0]), "heads": int(q.shape[1])})
        if self.log is not None:
            self.log.append(self.tag)
        out = ctx.attend(q, k, v, attn_mask, scale)
        return torch.zeros_like(out) if ctx.layer == self.zero_layer else out

    def report(self) -> dict[str, Any]:
        return {"records": self.records}


@dataclasses.dataclass(frozen=True)
class Record(MethodConfig):
    """Records each attention call's context; optionally zeroes one layer (to see changes take effect)."""

    name: ClassVar[str] = "test_record"
    kind: ClassVar[str] = "dit_attention"
    zero_layer: int | None = None

    def make_runtime(self, info):
        return _Recorder(self.name, None, self.zero_layer)


@dataclasses.dataclass(frozen=True)
class Tagged(MethodConfig):
    name: ClassVar[str] = "test_tagged"
    kind: ClassVar[str] = "dit_attention"
    tag: str = "a"
    log: Any = None

    def make_runtime(self, info):
        return _Recorder(self.tag, self.log, None)


@dataclasses.dataclass(frozen=True)
class NotForDiT(MethodConfig):
    name: ClassVar[str] = "test_vlm_only"
    kind: ClassVar[str] = "visual_token_pruner"


def processors(model: torch.nn.Module) -> dict[str, Any]:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


# ---------------------------------------------------------------------------------------------- layout
EXPECTED = {  # family: (n_layers, primary roles, text position of joint sites, number of cross sites)
    "sd3": (2, {"joint"}, "last", 0),
    "flux": (2, {"joint"}, "first", 0),
    "pixart": (2, {"self"}, None, 2),
    "wan": (2, {"self"}, None, 2),
    "hunyuan_video": (2, {"joint"}, "last", 0),
    "cogvideox": (2, {"joint"}, "first", 0),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_sites_and_layout(transformers, family):
    model = transformers(family)
    info = describe(model)
    n_layers, roles, text, n_cross = EXPECTED[family]
    assert info.n_layers == n_layers
    prim = info.primary_sites()
    assert [s.layer for s in prim] == list(range(n_layers))
    assert {s.role for s in prim} == roles
    assert {s.text_position for s in prim} == {text}
    assert sum(s.is_cross for s in info.sites) == n_cross
    assert all(s.heads == model.config.num_attention_heads for s in prim)
    if family == "flux":
        assert [s.name for s in prim] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    if family == "hunyuan_video":  # the text token refiner's attention is not a site
        assert not any("refiner" in s.name for s in info.sites)


@pytest.mark.parametrize("family", tp.FAMILIES)
def test_dense_passthrough_is_exact_and_remove_restores(pipes, family):
    pipe = pipes(family)
    before = processors(pipe.transformer)
    ref = generate(pipe, family)
    with mmeff.apply(pipe, Dense()) as h:
        wrapped = processors(pipe.transformer)
        swapped = [n for n in before if wrapped[n] is not before[n]]
        assert swapped
        for n in swapped:  # same class family and the same __call__ signature (diffusers filters kwargs by it)
            assert isinstance(wrapped[n], type(before[n]))
            assert inspect.signature(wrapped[n].__call__) == inspect.signature(before[n].__call__)
        out = generate(pipe, family)
    assert torch.equal(out, ref)
    after = processors(pipe.transformer)
    assert all(after[n] is before[n] for n in before)  # the exact original processor objects
    assert torch.equal(generate(pipe, family), ref)
    assert not h.active


@pytest.mark.parametrize("family", ["hunyuan_video", "cogvideox", "flux", "wan"])
def test_dense_passthrough_on_bare_transformers(transformers, family):
    model = transformers(family)
    inputs = transformer_inputs(family, batch=2)
    ref = forward(model, inputs)
    with mmeff.apply(model, Dense()):
        assert torch.equal(forward(model, inputs), ref)
    assert torch.equal(forward(model, inputs), ref)


def test_a_changing_method_takes_effect_and_is_undone(pipes):
    pipe = pipes("pixart")
    ref = generate(pipe, "pixart")
    with mmeff.apply(pipe, Record(zero_layer=0)):
        out = generate(pipe, "pixart")
    assert not torch.equal(out, ref)
    assert torch.equal(generate(pipe, "pixart"), ref)


def test_methods_compose_outer_to_inner(pipes):
    pipe = pipes("sd3")
    log: list[str] = []
    with mmeff.apply(pipe, Tagged(tag="outer", log=log), Tagged(tag="inner", log=log)):
        generate(pipe, "sd3", steps=1)
    assert log[:2] == ["outer", "inner"] and len(log) == 2 * 2  # 2 joint sites, 1 step


# ---------------------------------------------------------------------------------------------- context
def test_context_layout_and_steps_flux(pipes):
    pipe = pipes("flux")
    with mmeff.apply(pipe, Record()) as h:
        generate(pipe, "flux", steps=2)  # true CFG: cond + uncond call per step
        recs = h.report()["per_method"]["test_record"]["records"]
    double = [r for r in recs if r["site"].startswith("transformer_blocks")]
    assert [r["step"] for r in double] == [0, 0, 1, 1]
    assert all(r["num_steps"] == 2 for r in recs)
    r = double[0]
    assert r["grid"] == (1, 8, 8)  # 16 px, vae factor 1, 2x2 packing
    n_img = 64
    assert r["text"] == (0, r["seq"] - n_img) and r["image"] == (r["seq"] - n_img, r["seq"])
    single = [x for x in recs if x["site"].startswith("single")]
    assert single and single[0]["layer"] == 1 and single[0]["text"] == r["text"]


def test_context_layout_sd3_text_last(pipes):
    pipe = pipes("sd3")
    with mmeff.apply(pipe, Record()) as h:
        generate(pipe, "sd3", steps=2)
        recs = h.report()["per_method"]["test_record"]["records"]
    r = recs[0]
    n_img = 8 * 8  # vae factor 1, patch 2
    assert r["grid"] == (1, 8, 8) and r["image"] == (0, n_img) and r["text"] == (n_img, r["seq"])
    assert r["batch"] == 2  # CFG batch [uncond, cond]
    assert [x["step"] for x in recs] == [0, 0, 1, 1]


@pytest.mark.parametrize("family,grid", [("wan", (2, 2, 2)), ("cogvideox", (2, 2, 2))])
def test_context_video_grid(pipes, family, grid):
    pipe = pipes(family)
    with mmeff.apply(pipe, Record()) as h:
        generate(pipe, family, steps=1)
        recs = h.report()["per_method"]["test_record"]["records"]
    prim = [r for r in recs if r["layer"] == 0]
    assert prim and prim[0]["grid"] == grid
    n = grid[0] * grid[1] * grid[2]
    if family == "wan":
        assert prim[0]["text"] is None and prim[0]["seq"] == n
    else:
        assert prim[0]["text"] == (0, prim[0]["seq"] - n)


def test_context_hunyuan_mask_and_layout(transformers):
    model = transformers("hunyuan_video")
    with mmeff.apply(model, Record()) as h:
        forward(model, transformer_inputs("hunyuan_video"))
        recs = h.report()["per_method"]["test_record"]["records"]
    assert len(recs) == 2  # 1 double + 1 single block; the refiner is untouched
    for r in recs:
        assert r["grid"] == (3, 4, 4) and r["image"] == (0, 48) and r["text"] == (48, 54)
        assert r["num_steps"] is None


def test_step_tracker_counts_and_partners():
    tr = StepTracker(None)
    x, y = torch.zeros(1), torch.zeros(1)
    a = tr.on_call(torch.tensor([999.0]), x)
    b = tr.on_call(torch.tensor([999.0]), x)      # uncond call on the same latents
    c = tr.on_call(torch.tensor([500.0]), y)
    d = tr.on_call(torch.tensor([999.0]), y)      # a new generation
    assert (a.step, b.step, c.step, d.step) == (0, 0, 1, 0)
    assert (a.partner, b.partner, c.partner) == (False, True, False)
    assert tr.generations == 2
    y.add_(1)                                     # same tensor, changed in place: not a partner
    assert not tr.on_call(torch.tensor([999.0]), y).partner


def test_step_tracker_under_inference_mode():
    """Inference tensors have no version counter: steps and partners still work (identity decides)."""
    tr = StepTracker(None)
    with torch.inference_mode():
        x, y = torch.zeros(1), torch.zeros(1)
        calls = [tr.on_call(torch.tensor([t]), h) for t, h in ((999.0, x), (999.0, x), (500.0, y))]
    assert [c.step for c in calls] == [0, 0, 1]
    assert [c.partner for c in calls] == [False, True, False]


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_guidance_runs_the_same_under_inference_mode(pipes, family):
    """Users often wrap pipelines in ``torch.inference_mode()``; the hooks must not depend on autograd state."""
    from mmeff.guidance import SoftPAG

    pipe = pipes(family)
    with mmeff.apply(pipe, SoftPAG(heads="0.0;1.1", u=1.0, scale=3.0)):
        ref = generate(pipe, family)
        with torch.inference_mode():
            got = tp.image_of(pipe(**tp.call_kwargs(family)))
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------- backends
def test_dispatcher_model_on_another_backend(pipes):
    pipe = pipes("flux")
    pipe.transformer.set_attention_backend("_native_math")
    try:
        ref = generate(pipe, "flux", steps=1)
        with mmeff.apply(pipe, Dense()):
            out = generate(pipe, "flux", steps=1)
        assert torch.equal(out, ref)
    finally:
        pipe.transformer.reset_attention_backend()


def test_processor_without_sdpa_is_a_clear_error():
    from diffusers.models.attention_processor import AttnProcessor

    model = tp.pixart_transformer()
    model.transformer_blocks[0].attn1.set_processor(AttnProcessor())  # bmm/softmax, no SDPA
    with mmeff.apply(model, Dense()), pytest.raises(UnsupportedModelError, match="did not call scaled_dot"):
        forward(model, transformer_inputs("pixart"))


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_models_are_clear_errors():
    from diffusers import DiTTransformer2DModel

    with pytest.raises(UnsupportedModelError, match="supported hosts:.*dit"):
        mmeff.apply(torch.nn.Linear(2, 2), Dense())
    dit = DiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                sample_size=8, patch_size=2, norm_type="ada_norm_zero")
    for obj in (dit, types.SimpleNamespace(transformer=dit)):
        with pytest.raises(UnsupportedModelError, match="SD3Transformer2DModel.*FluxTransformer2DModel"):
            mmeff.apply(obj, Dense())


def test_apply_twice_raises(pipes):
    pipe = pipes("sd3")
    with mmeff.apply(pipe, Dense()):
        with pytest.raises(AlreadyAppliedError):
            mmeff.apply(pipe, Dense())
        with pytest.raises(AlreadyAppliedError):
            mmeff.apply(pipe.transformer, Dense())
    with mmeff.apply(pipe, Dense()):  # fine again after removal
        pass


def test_wrong_kind_is_rejected_and_nothing_is_applied(pipes):
    pipe = pipes("pixart")
    before = processors(pipe.transformer)
    with pytest.raises(ConfigError, match="cannot be applied to a DiT"):
        mmeff.apply(pipe, Dense(), NotForDiT())
    assert all(processors(pipe.transformer)[n] is p for n, p in before.items())
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert mmeff.core.active_handle(pipe) is None


def test_report_has_layout_and_method_time(pipes):
    pipe = pipes("sd3")
    with mmeff.apply(pipe, Record()) as h:
        generate(pipe, "sd3", steps=1)
        rep = h.report()
    assert rep["host"] == "dit" and rep["family"] == "sd3" and rep["n_layers"] == 2
    assert rep["heads_per_layer"] == {0: 4, 1: 4}
    assert rep["wrapped_sites"] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert rep["per_method"]["test_record"]["method_seconds"] >= 0.0
    assert rep["methods"][0]["method"] == "test_record"
