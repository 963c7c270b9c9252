"""Rectified SpaAttn and VMoBA through the DiT adapter on tiny Wan, HunyuanVideo and CogVideoX."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff import ConfigError
from mmeff.video import VMoBA, RectifiedSpaAttn
from mmeff.zoo.tiny_pipelines import call_kwargs, image_of, tiny_pipeline, tiny_transformer

FAMILIES = ["wan", "hunyuan_video", "cogvideox"]


def _inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "wan":  # latent 4 x 16 x 16, patch (1, 2, 2) -> grid 4 x 8 x 8 = 256 video tokens
        return dict(hidden_states=torch.randn(1, 16, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    if family == "hunyuan_video":  # grid 4 x 8 x 8, text last with 2 padded tokens
        return dict(hidden_states=torch.randn(1, 4, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                    encoder_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                    pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.tensor([1000.0]))
    # CogVideoX: latent frames 4, 16 x 16 px latent, patch 2 -> grid 4 x 8 x 8, text first
    return dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 16, 32, generator=g))


_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_transformer(family)
    return _MODELS[family]


def run(model, family):
    with torch.no_grad():
        out = model(**_inputs(family), return_dict=False)[0]
    return out


SPARSE = {
    "rectified": lambda: RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none"),
    "rectified_plain": lambda: RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none", ipar=False, gapr=False),
    "vmoba": lambda: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk", topk=(2, 2, 2)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_settings_are_exact_and_remove_restores(family):
    model = model_of(family)
    ref = run(model, family)
    for cfg in (RectifiedSpaAttn(drop=0.0, block=16), VMoBA(temporal_chunk="1", spatial_chunk="4x4",
                                                              st_chunk="2x4x4", mode="topk", topk=(4, 4, 4),
                                                              first_full_layer=99)):
        with mmeff.apply(model, cfg):
            assert torch.equal(run(model, family), ref)
    h = mmeff.apply(model, SPARSE["rectified"]())
    sparse = run(model, family)
    assert not torch.equal(sparse, ref)
    h.remove()
    assert torch.equal(run(model, family), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_methods_run_and_report_sparsity(family, name):
    model = model_of(family)
    ref = run(model, family)
    with mmeff.apply(model, SPARSE[name]()) as h:
        out = run(model, family)
    rep = h.report()["per_method"][SPARSE[name]().name]
    assert rep["calls"]["sparse"] > 0, rep
    sparsity = list(rep["sparsity_per_layer"].values())
    assert max(sparsity) > 0.2, sparsity
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1.0


def test_rectification_beats_plain_block_sparse_on_wan():
    """On the same block selection, IPAR + GAPR bring the transformer output closer to dense."""
    model = model_of("wan")
    ref = run(model, "wan")
    errs = {}
    for name in ("rectified", "rectified_plain"):
        with mmeff.apply(model, SPARSE[name]()):
            errs[name] = ((run(model, "wan") - ref).norm() / ref.norm()).item()
    assert errs["rectified"] < errs["rectified_plain"], errs


def test_dense_warmup_steps_and_layers_follow_the_pipeline():
    pipe = tiny_pipeline("wan")
    ref = image_of(pipe(**call_kwargs("wan")))
    with mmeff.apply(pipe, RectifiedSpaAttn(drop=0.75, block=16, warmup_steps=2, preset="none")) as h:
        out = image_of(pipe(**call_kwargs("wan", steps=2)))
    assert torch.equal(out, ref)  # both steps are warm-up steps: dense
    assert h.report()["per_method"]["rectified_spaattn"]["calls"]["sparse"] == 0
    with mmeff.apply(pipe, RectifiedSpaAttn(drop=0.75, block=4, dense_layers=(0, 1), preset="none")) as h:
        out = image_of(pipe(**call_kwargs("wan")))
    assert torch.equal(out, ref)


def test_presets_and_errors():
    assert RectifiedSpaAttn().resolved("wan")["drop"] == 0.75
    assert RectifiedSpaAttn().resolved("hunyuan_video")["drop"] == 0.8
    assert RectifiedSpaAttn(drop=0.9).resolved("wan")["drop"] == 0.9
    with pytest.raises(ConfigError, match="drop"):
        RectifiedSpaAttn(drop=1.0)
    with pytest.raises(ConfigError, match="preset"):
        RectifiedSpaAttn(preset="nosuch")
    with pytest.raises(ConfigError, match="chunk shapes"):
        VMoBA()
    assert VMoBA(preset="wan2.1-1.3b-480p").resolved()["threshold"] == 0.25
    model = model_of("wan")
    with pytest.raises(ValueError, match="divis|divid"):
        with mmeff.apply(model, VMoBA(temporal_chunk="1", spatial_chunk="3x3", st_chunk="2x4x4")):
            run(model, "wan")


def test_official_options_via_spec_strings_and_errors():
    from mmeff.core.registry import parse_method as parse_spec

    cfg = parse_spec("rectified_spaattn:floor=joint,drop=0.8,block=16")
    assert isinstance(cfg, RectifiedSpaAttn) and cfg.floor == "joint" and "floor=joint" in cfg.spec()
    cfg = parse_spec("vmoba:preset=wan2.1-1.3b-480p,budget_scope=batch")
    assert isinstance(cfg, VMoBA) and cfg.resolved()["budget_scope"] == "batch" and "budget_scope=batch" in cfg.spec()
    assert RectifiedSpaAttn().floor == "visual" and VMoBA(preset="wan2.1-1.3b-480p").budget_scope == "sample"
    with pytest.raises(ConfigError, match="floor must be one of .*'joint'"):
        RectifiedSpaAttn(floor="text")
    with pytest.raises(ConfigError, match="budget_scope must be one of .*'batch'"):
        VMoBA(preset="wan2.1-1.3b-480p", budget_scope="global")


def test_joint_floor_at_drop_zero_runs_the_official_sparse_rule_with_text():
    """floor='joint' reproduces the official rule, under which drop=0 with text is not dense, so the runtime
    must not short-cut drop=0 to dense attention there; the default floor does (and stays exact). Whether a
    block is then dropped depends on the text ranking (tests/video/test_official_agreement.py)."""
    model = model_of("hunyuan_video")
    calls = {}
    for floor in ("visual", "joint"):
        with mmeff.apply(model, RectifiedSpaAttn(drop=0.0, tau=0.2, block=16, preset="none", floor=floor)) as h:
            out = run(model, "hunyuan_video")
        calls[floor] = h.report()["per_method"]["rectified_spaattn"]["calls"]
        assert torch.isfinite(out).all()
    assert calls["visual"]["sparse"] == 0 and calls["joint"]["sparse"] > 0, calls


def test_vmoba_batch_scope_needs_equal_text_lengths():
    model = model_of("hunyuan_video")
    kw = _inputs("hunyuan_video")
    two = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 1 else v) for k, v in kw.items()}
    two["timestep"] = torch.tensor([500, 500])
    two["guidance"] = torch.tensor([1000.0, 1000.0])
    two["encoder_attention_mask"] = torch.tensor([[1] * 6 + [0] * 2, [1] * 8])
    cfg = VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk", topk=(2, 2, 2),
                budget_scope="batch")
    with mmeff.apply(model, cfg), torch.no_grad(), pytest.raises(ConfigError, match="budget_scope='batch'"):
        model(**two, return_dict=False)
    with mmeff.apply(model, cfg), torch.no_grad():  # equal lengths: one packed call, runs
        out = model(**{**two, "encoder_attention_mask": torch.tensor([[1] * 8, [1] * 8])}, return_dict=False)[0]
    assert torch.isfinite(out).all()
