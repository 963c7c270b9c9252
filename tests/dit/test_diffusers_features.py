"""The DiT host next to diffusers' own features, in both orders (the diffusers call before and after apply).

Never silently off: a processor replaced after apply, a call from a second pipeline sharing the transformer,
and batch-row-adding guidance next to a diffusers cache are refused at the next call with one clear error;
``remove()`` never undoes what the user set after apply, and nothing of mmeff survives in diffusers' copies.
Each test builds its own tiny pipeline (these calls change the model).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import pytest
import torch

import mmeff
from mmeff import AlreadyAppliedError, IncompatibleFeatureError, UnsupportedModelError
from mmeff.core.config import MethodConfig
from mmeff.guidance import SoftPAG
from mmeff.zoo import tiny_pipelines as tp

from .conftest import forward, generate, transformer_inputs

ACTIVE = SoftPAG(layers=(0, 1), u=1.0, scale=3.0)
REPLACED = "replaced after mmeff.apply"
WAY_OUT = "Apply mmeff after it, or remove\\(\\) first"


@dataclasses.dataclass(frozen=True)
class Dense(MethodConfig):
    name: ClassVar[str] = "test_dense_features"
    kind: ClassVar[str] = "dit_attention"

    def attention(self, ctx, q, k, v, attn_mask, scale):
        return ctx.attend(q, k, v, attn_mask, scale)


def is_wrapper(processor: Any) -> bool:
    """Independent of mmeff's own helper: any object of mmeff's wrapper classes or carrying its inner processor."""
    return type(processor).__name__.startswith("Mmeff") or "_mmeff_inner" in getattr(processor, "__dict__", {})


def procs(model: torch.nn.Module) -> dict[str, Any]:
    return dict(model.attn_processors)


def no_mmeff_anywhere(model: torch.nn.Module) -> bool:
    saved = getattr(model, "original_attn_processors", None) or {}
    return not any(is_wrapper(p) for p in [*procs(model).values(), *saved.values()])


def plain(family: str, **kw: Any) -> torch.Tensor:
    """The output of a fresh pipeline without mmeff (the reference)."""
    return generate(tp.tiny_pipeline(family), family, **kw)


# ---------------------------------------------------------------------------------------------- set_attn_processor
def test_set_attn_processor_after_apply_is_refused_and_remove_keeps_it():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tp.tiny_pipeline("pixart")
    h = mmeff.apply(pipe, ACTIVE)
    mine = AttnProcessor2_0()
    pipe.transformer.set_attn_processor(mine)
    with pytest.raises(IncompatibleFeatureError, match=f"{REPLACED}, by set_attn_processor.*{WAY_OUT}"):
        generate(pipe, "pixart")
    assert h.report()["branch_calls"] == 0  # refused before any guidance row was added
    h.remove()
    assert all(p is mine for p in procs(pipe.transformer).values())  # the user's processor stays everywhere
    assert torch.equal(generate(pipe, "pixart"), plain("pixart"))


def test_set_attn_processor_before_apply_is_followed():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tp.tiny_pipeline("pixart")
    mine = AttnProcessor2_0()
    pipe.transformer.set_attn_processor(mine)
    ref = generate(pipe, "pixart")
    with mmeff.apply(pipe, ACTIVE) as h:
        guided = generate(pipe, "pixart")
        assert h.report()["branch_calls"] == 2
    assert not torch.equal(guided, ref)
    assert all(p is mine for p in procs(pipe.transformer).values())
    assert torch.equal(generate(pipe, "pixart"), ref)


def test_set_default_attn_processor_after_apply_is_refused_and_not_mixed_on_remove():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tp.tiny_pipeline("pixart")
    h = mmeff.apply(pipe, ACTIVE)
    pipe.transformer.set_default_attn_processor()
    with pytest.raises(IncompatibleFeatureError, match=f"now AttnProcessor\\).*{WAY_OUT}"):
        generate(pipe, "pixart")
    h.remove()
    assert {type(p) for p in procs(pipe.transformer).values()} == {AttnProcessor}  # no mix with 2_0


def test_set_default_attn_processor_before_apply_names_the_cause():
    pipe = tp.tiny_pipeline("pixart")
    pipe.transformer.set_default_attn_processor()  # AttnProcessor: bmm + softmax, no SDPA to route
    cause = "did not call scaled_dot_product_attention.*AttnProcessor2_0"
    with mmeff.apply(pipe, ACTIVE), pytest.raises(UnsupportedModelError, match=cause):
        generate(pipe, "pixart")


def test_a_retired_wrapper_reinstalled_from_a_saved_dict_is_its_processor():
    """A user (or a PAG pipeline) saves ``attn_processors`` while applied and sets them back after remove."""
    pipe = tp.tiny_pipeline("sd3")
    ref = generate(pipe, "sd3")
    with mmeff.apply(pipe, ACTIVE):
        saved = procs(pipe.transformer)
    pipe.transformer.set_attn_processor(saved)
    assert torch.equal(generate(pipe, "sd3"), ref)
    with mmeff.apply(pipe, ACTIVE):  # wrapping a retired wrapper wraps what it stands for
        assert not torch.equal(generate(pipe, "sd3"), ref)
    assert no_mmeff_anywhere(pipe.transformer)  # and remove() puts back the plain processors
    assert torch.equal(generate(pipe, "sd3"), ref)


def test_copies_of_a_wrapper_are_plain_processors():
    pipe = tp.tiny_pipeline("flux")
    with mmeff.apply(pipe, ACTIVE):
        wrapper = pipe.transformer.transformer_blocks[0].attn.processor
        base = type(wrapper).__mro__[1]
        assert type(type(wrapper)()) is base          # diffusers' `type(p)()` re-creation
        assert type(copy.deepcopy(wrapper)) is base   # copies carry no mmeff hook
        assert type(copy.copy(wrapper)) is base


# ---------------------------------------------------------------------------------------------- fused QKV
@pytest.mark.parametrize("family", ["sd3", "pixart", "cogvideox"])
def test_fuse_after_apply_is_refused_and_remove_then_unfuse_brings_nothing_back(family):
    pipe = tp.tiny_pipeline(family)
    before = procs(pipe.transformer)
    h = mmeff.apply(pipe, ACTIVE)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(IncompatibleFeatureError, match=f"by fuse_qkv_projections\\(\\).*{WAY_OUT}"):
        generate(pipe, family)
    h.remove()
    assert all(type(p).__name__.startswith("Fused") for p in procs(pipe.transformer).values())
    assert no_mmeff_anywhere(pipe.transformer)
    pipe.transformer.unfuse_qkv_projections()
    after = procs(pipe.transformer)
    assert all(after[n] is before[n] for n in before)  # diffusers put back the exact pre-apply objects
    with mmeff.apply(pipe, ACTIVE):  # and mmeff applies again
        generate(pipe, family)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_fuse_before_apply_works_and_unfuse_while_applied_is_refused(family):
    pipe = tp.tiny_pipeline(family)
    pipe.transformer.fuse_qkv_projections()
    ref = generate(pipe, family)
    h = mmeff.apply(pipe, Dense())
    assert torch.equal(generate(pipe, family), ref)
    pipe.transformer.unfuse_qkv_projections()
    with pytest.raises(IncompatibleFeatureError, match=f"by unfuse_qkv_projections.*{WAY_OUT}"):
        generate(pipe, family)
    h.remove()
    assert no_mmeff_anywhere(pipe.transformer)


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("order", ["fuse_then_apply", "apply_then_fuse"])
def test_fuse_on_dispatcher_models_keeps_mmeff_on_in_both_orders(family, order):
    """FLUX / Wan fuse the projection weights in place and keep their processors, so mmeff stays on."""
    pipe = tp.tiny_pipeline(family)
    pipe.transformer.fuse_qkv_projections()
    ref = generate(pipe, family)
    pipe.transformer.unfuse_qkv_projections()
    if order == "fuse_then_apply":
        pipe.transformer.fuse_qkv_projections()
    h = mmeff.apply(pipe, Dense())
    if order == "apply_then_fuse":
        pipe.transformer.fuse_qkv_projections()
    assert all(m.fused_projections for m in pipe.transformer.modules() if hasattr(m, "fused_projections"))
    assert torch.equal(generate(pipe, family), ref)
    assert h.report()["attention_calls"] > 0  # the attention ops still reach mmeff
    h.remove()
    with mmeff.apply(pipe, ACTIVE) as h:
        assert not torch.equal(generate(pipe, family), ref) and h.report()["branch_calls"] == 2
    assert no_mmeff_anywhere(pipe.transformer)


# ---------------------------------------------------------------------------------------------- FLUX IP-Adapter
def _ip_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random IP-Adapter weights in the layout diffusers' FLUX loader reads (no download)."""
    g = torch.Generator().manual_seed(seed)
    dim, clip_dim, tokens = model.config.joint_attention_dim, 16, 4

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    image_proj = {"proj.weight": r(tokens * dim, clip_dim), "proj.bias": r(tokens * dim),
                  "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    ip = {}
    for i in range(len(model.transformer_blocks)):
        for kind in ("k", "v"):
            ip[f"{i}.to_{kind}_ip.weight"] = r(inner, dim)
            ip[f"{i}.to_{kind}_ip.bias"] = r(inner)
    return {"image_proj": image_proj, "ip_adapter": ip}


def _load_ip(pipe: Any) -> None:
    """What ``FluxPipeline.load_ip_adapter`` does to the transformer, with synthetic weights."""
    pipe.transformer._load_ip_adapter_weights(_ip_state_dict(pipe.transformer), low_cpu_mem_usage=False)


def _ip_generate(pipe: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 1, 16, generator=g), torch.zeros(1, 1, 16)
    return generate(pipe, "flux", ip_adapter_image_embeds=[emb], negative_ip_adapter_image_embeds=[neg])


def test_flux_ip_adapter_loaded_before_apply_works():
    from diffusers.models.transformers.transformer_flux import (
        FluxIPAdapterAttnProcessor,
    )

    pipe = tp.tiny_pipeline("flux")
    _load_ip(pipe)
    ref = _ip_generate(pipe)
    assert not torch.equal(ref, generate(pipe, "flux", ip_adapter_image_embeds=[torch.zeros(1, 1, 16)],
                                         negative_ip_adapter_image_embeds=[torch.zeros(1, 1, 16)]))
    with mmeff.apply(pipe, Dense()):
        assert torch.equal(_ip_generate(pipe), ref)  # exact, IP attention included
    with mmeff.apply(pipe, ACTIVE) as h:  # the guidance branch carries the image embeddings too
        guided = _ip_generate(pipe)
        assert h.report()["branch_calls"] == 2
    assert not torch.equal(guided, ref)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, FluxIPAdapterAttnProcessor)
    assert no_mmeff_anywhere(pipe.transformer)
    assert torch.equal(_ip_generate(pipe), ref)
    h = mmeff.apply(pipe, Dense())
    pipe.unload_ip_adapter()  # while applied: diffusers re-creates every processor
    with pytest.raises(IncompatibleFeatureError, match=f"by unload_ip_adapter\\(\\).*{WAY_OUT}"):
        generate(pipe, "flux")
    h.remove()
    assert {type(p).__name__ for p in procs(pipe.transformer).values()} == {"FluxAttnProcessor"}
    assert torch.equal(generate(pipe, "flux"), plain("flux"))


def test_flux_ip_adapter_loaded_after_apply_is_refused_cleanly():
    from diffusers.models.transformers.transformer_flux import (
        FluxAttnProcessor,
        FluxIPAdapterAttnProcessor,
    )

    pipe = tp.tiny_pipeline("flux")
    h = mmeff.apply(pipe, ACTIVE)
    _load_ip(pipe)  # diffusers re-creates the single-block processors with type(p)(): no AttributeError
    assert no_mmeff_anywhere(pipe.transformer)
    with pytest.raises(IncompatibleFeatureError, match=f"by load_ip_adapter\\(\\).*{WAY_OUT}"):
        _ip_generate(pipe)
    h.remove()
    blocks = pipe.transformer
    assert type(blocks.transformer_blocks[0].attn.processor) is FluxIPAdapterAttnProcessor  # the adapter stays
    assert type(blocks.single_transformer_blocks[0].attn.processor) is FluxAttnProcessor
    ref = _ip_generate(pipe)
    with mmeff.apply(pipe, Dense()):  # applying after the load works
        assert torch.equal(_ip_generate(pipe), ref)


# ---------------------------------------------------------------------------------------------- shared transformer
@pytest.mark.parametrize("second_built", ["before_apply", "after_apply"])
def test_a_second_pipeline_sharing_the_transformer_gets_a_clear_error(second_built):
    from diffusers import StableDiffusion3Pipeline

    first = tp.tiny_pipeline("sd3")
    ref_first = generate(first, "sd3")
    ref_second = generate(first, "sd3", cfg=1.0, prompt=["a red cube", "a blue ball"])
    second = StableDiffusion3Pipeline(**first.components) if second_built == "before_apply" else None
    h = mmeff.apply(first, ACTIVE)
    if second is None:
        second = StableDiffusion3Pipeline(**first.components)
    second.set_progress_bar_config(disable=True)
    assert second.transformer is first.transformer
    with pytest.raises(AlreadyAppliedError, match="shared by two pipelines.*StableDiffusion3Pipeline"):
        generate(second, "sd3", cfg=1.0, prompt=["a red cube", "a blue ball"])
    assert h.report()["branch_calls"] == 0
    guided = generate(first, "sd3")  # the pipeline mmeff was applied to keeps working
    assert not torch.equal(guided, ref_first)
    h.remove()
    assert torch.equal(generate(second, "sd3", cfg=1.0, prompt=["a red cube", "a blue ball"]), ref_second)


def test_applied_to_the_bare_transformer_any_pipeline_may_call_it():
    """Not bound to a pipeline: each call is read from its own inputs (CFG halves), not another's flag."""
    from diffusers import StableDiffusion3Pipeline

    first = tp.tiny_pipeline("sd3")
    second = StableDiffusion3Pipeline(**first.components)
    second.set_progress_bar_config(disable=True)
    with mmeff.apply(first.transformer, ACTIVE) as h:
        generate(first, "sd3")
        generate(second, "sd3", cfg=1.0)
        assert h.report()["branch_calls"] == 4


# ---------------------------------------------------------------------------------------------- attention backends
@pytest.fixture
def restore_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("order", ["backend_then_apply", "apply_then_backend"])
def test_set_attention_backend_either_order_is_followed(restore_backend, order):
    model = tp.tiny_transformer("flux")
    inputs = transformer_inputs("flux", batch=2)
    model.set_attention_backend("flex")
    ref = forward(model, inputs)
    model.reset_attention_backend()
    if order == "backend_then_apply":
        model.set_attention_backend("flex")
        h = mmeff.apply(model, Dense())
    else:
        h = mmeff.apply(model, Dense())
        model.set_attention_backend("flex")
    for proc in procs(model).values():  # the wrapper keeps its pin; the user's backend is the inner's
        assert proc._attention_backend.value == "native" and proc._mmeff_inner._attention_backend.value == "flex"
    torch.testing.assert_close(forward(model, inputs), ref, rtol=0, atol=1e-6)
    h.remove()
    assert all(p._attention_backend.value == "flex" for p in procs(model).values())  # the user's choice stays
    torch.testing.assert_close(forward(model, inputs), ref, rtol=0, atol=0)


def test_reset_attention_backend_after_apply_is_followed(restore_backend):
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
    )

    model = tp.tiny_transformer("wan")
    inputs = transformer_inputs("wan")
    ref = forward(model, inputs)
    model.set_attention_backend("flex")
    with mmeff.apply(model, ACTIVE):
        model.reset_attention_backend()  # processors back to "whatever is active"; make that native again
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        wrapped = [p for p in procs(model).values() if is_wrapper(p)]
        assert wrapped and all(p._mmeff_inner._attention_backend is None for p in wrapped)
        assert all(p._attention_backend == AttentionBackendName.NATIVE for p in wrapped)  # the pin holds
        forward(model, inputs)
    assert all(getattr(p, "_attention_backend", None) is None for p in procs(model).values())
    assert torch.equal(forward(model, inputs), ref)


# ---------------------------------------------------------------------------------------------- diffusers caches
CACHES = [("wan", "pab"), ("cogvideox", "faster"), ("wan", "first_block"), ("cogvideox", "first_block")]


@pytest.mark.parametrize("family,cache", CACHES)
def test_softpag_with_a_cache_enabled_first_is_refused_at_apply(family, cache):
    pipe = tp.tiny_pipeline(family)
    pipe.transformer.enable_cache(tp.diffusers_cache(cache, pipe))
    before = procs(pipe.transformer)
    with pytest.raises(IncompatibleFeatureError, match="appends perturbed batch rows.*cache.*found at apply.*"
                                                       "disable_cache"):
        mmeff.apply(pipe, ACTIVE)
    assert all(procs(pipe.transformer)[n] is p for n, p in before.items())  # nothing half-applied
    assert mmeff.core.active_handle(pipe) is None
    with mmeff.apply(pipe, SoftPAG(layers=(0, 1), u=0.0)):  # no-op settings add no rows: allowed
        generate(pipe, family, steps=3)


@pytest.mark.parametrize("family,cache", CACHES)
def test_a_cache_enabled_after_softpag_is_refused_at_the_next_call(family, cache):
    pipe = tp.tiny_pipeline(family)
    with mmeff.apply(pipe, ACTIVE) as h:
        generate(pipe, family)
        calls = h.report()["branch_calls"]
        pipe.transformer.enable_cache(tp.diffusers_cache(cache, pipe))
        with pytest.raises(IncompatibleFeatureError, match="appends perturbed batch rows.*found at this call"):
            generate(pipe, family, steps=3)
        assert h.report()["branch_calls"] == calls


# ---------------------------------------------------------------------------------------------- PAG pipelines
def _sd3_pag(layers: list[str]) -> Any:
    from diffusers import StableDiffusion3PAGPipeline

    parts = {k: v for k, v in tp.tiny_pipeline("sd3").components.items()
             if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pag_pipeline_swapping_mmeff_sites_is_refused_at_apply():
    pipe = _sd3_pag(["blocks.1"])
    before = procs(pipe.transformer)
    with pytest.raises(IncompatibleFeatureError, match="pag_applied_layers.*transformer_blocks.1.attn.*"
                                                       "set_pag_applied_layers"):
        mmeff.apply(pipe, ACTIVE)
    assert all(procs(pipe.transformer)[n] is p for n, p in before.items())  # the dry run put everything back
    assert mmeff.core.active_handle(pipe) is None


def test_a_pag_pipeline_on_other_layers_composes_with_softpag():
    pipe = _sd3_pag(["blocks.1"])
    ref = generate(pipe, "sd3", pag_scale=2.0)
    with mmeff.apply(pipe, SoftPAG(layers=(0,))) as h:
        out = generate(pipe, "sd3", pag_scale=2.0)
        assert h.report()["branch_calls"] == 2
        pipe.set_pag_applied_layers(["blocks.0"])  # now PAG would swap mmeff's site: refused at the call
        with pytest.raises(IncompatibleFeatureError, match="perturbed-attention guidance \\(PAG pipelines"):
            generate(pipe, "sd3", pag_scale=2.0)
    assert not torch.equal(out, ref)
