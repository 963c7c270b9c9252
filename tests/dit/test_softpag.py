"""SoftPAG on the tiny SD3 (with/without QK-norm), FLUX, PixArt, Wan and CogVideoX pipelines."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

import mmeff
from mmeff import ConfigError
from mmeff.core.config import MethodConfig
from mmeff.guidance import SoftPAG, load_preset
from mmeff.guidance.softpag import image_identity
from mmeff.hosts.dit_context import AttentionRuntime
from mmeff.zoo import tiny_pipelines as tp

from .conftest import forward, generate, transformer_inputs


# ---------------------------------------------------------------------------------------------- no-op and undo
@pytest.mark.parametrize("family", tp.FAMILIES)
def test_noop_settings_are_exact_and_remove_restores(pipes, family):
    pipe = pipes(family)
    ref = generate(pipe, family)
    for cfg in (SoftPAG(layers=(0, 1), u=0.0), SoftPAG(layers=(0, 1), scale=0.0)):
        with mmeff.apply(pipe, cfg) as h:
            assert torch.equal(generate(pipe, family), ref)
        assert h.report()["branch_calls"] == 0
    with mmeff.apply(pipe, SoftPAG(heads="0.0;1.1", u=1.0, scale=3.0)) as h:
        guided = generate(pipe, family)
        rep = h.report()
    assert not torch.equal(guided, ref)
    assert rep["branch_calls"] == 2 and rep["per_method"]["softpag"]["perturbed_attention_calls"] > 0
    assert h.report()["steps_seen"] == rep["steps_seen"] == rep["num_steps"] == 2  # also after removal
    assert torch.equal(generate(pipe, family), ref)


# ---------------------------------------------------------------------------------------------- the attention op
class _Grab:
    """Captures V (projection outputs) and the attention-op output (inputs of the output projections)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.store: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in ("to_v", "add_v_proj", "to_q", "to_k", "add_q_proj", "add_k_proj"):
            mod = getattr(attn, name, None)
            if mod is not None:
                self.handles.append(mod.register_forward_hook(self._out(name)))
        for name in ("to_out", "to_add_out"):
            mod = getattr(attn, name, None)
            mod = mod[0] if isinstance(mod, torch.nn.ModuleList) else mod
            if mod is not None:
                self.handles.append(mod.register_forward_pre_hook(self._in(name)))
        if getattr(attn, "to_out", None) is None:  # FLUX single block: the module returns the attention output
            self.handles.append(attn.register_forward_hook(self._out("to_out")))

    def _out(self, name: str):
        def hook(mod, args, out):
            self.store[name] = out.detach().clone()
        return hook

    def _in(self, name: str):
        def hook(mod, args):
            self.store[name] = args[0].detach().clone()
        return hook

    def joint(self, image: str, text: str, text_first: bool | None) -> torch.Tensor:
        parts = [self.store[image]] + ([self.store[text]] if text in self.store else [])
        if text_first and len(parts) == 2:
            parts = parts[::-1]
        return torch.cat(parts, 1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


CASES = [  # family, layer, attention module path, text first?
    ("pixart", 0, "transformer_blocks.0.attn1", None),
    ("sd3", 0, "transformer_blocks.0.attn", False),
    ("sd3_qknorm", 0, "transformer_blocks.0.attn", False),
    ("flux", 0, "transformer_blocks.0.attn", True),
    ("flux", 1, "single_transformer_blocks.0.attn", True),
    ("wan", 1, "blocks.1.attn1", None),
    ("cogvideox", 0, "transformer_blocks.0.attn1", None),
    ("hunyuan_video", 0, "transformer_blocks.0.attn", False),
]


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, -1))  # [B, S, H, D]


@pytest.mark.parametrize("family,layer,path,text_first", CASES)
def test_attention_op_interpolates_towards_v(transformers, family, layer, path, text_first):
    model = transformers(family)
    attn = model.get_submodule(path)
    n = attn.heads
    inputs = transformer_inputs(family, batch=1)
    for u in (1.0, 0.3):
        grab = _Grab(attn)
        try:
            with mmeff.apply(model, SoftPAG(heads=f"{layer}.1", u=u)):
                forward(model, inputs)  # batch 1 -> [row, perturbed copy]; inputs of `layer` are equal
        finally:
            grab.remove()
        if family == "cogvideox":  # the processor concatenates text first and projects once
            v, o = grab.store["to_v"], grab.store["to_out"]
        else:
            v = grab.joint("to_v", "add_v_proj", text_first)
            o = grab.joint("to_out", "to_add_out", text_first)
        assert o.shape[0] == 2
        v, o = _heads(v, n), _heads(o, n)
        clean, pert = o[0], o[1]
        others = [h for h in range(n) if h != 1]
        torch.testing.assert_close(pert[:, others], clean[:, others], rtol=0, atol=1e-6)
        if u == 1.0:
            assert torch.equal(pert[:, 1], v[1][:, 1])
        else:
            torch.testing.assert_close(pert[:, 1], (1 - u) * clean[:, 1] + u * v[1][:, 1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(clean[:, 1], v[0][:, 1])


def test_image_identity_matches_a_masked_reference_sd3(transformers):
    model = transformers("sd3")  # no QK-norm, no RoPE: q/k are the projection outputs
    attn = model.transformer_blocks[0].attn
    n = attn.heads
    inputs = transformer_inputs("sd3", batch=1)
    for u in (1.0, 0.5):
        grab = _Grab(attn)
        try:
            with mmeff.apply(model, SoftPAG(heads="0.2", u=u, mode="image_identity")):
                forward(model, inputs)
        finally:
            grab.remove()
        q = _heads(grab.joint("to_q", "add_q_proj", False), n).transpose(1, 2)
        k = _heads(grab.joint("to_k", "add_k_proj", False), n).transpose(1, 2)
        v = _heads(grab.joint("to_v", "add_v_proj", False), n).transpose(1, 2)
        o = _heads(grab.joint("to_out", "to_add_out", False), n).transpose(1, 2)  # [2, H, S, D]
        n_img, s = 16, q.shape[2]
        allowed = torch.ones(s, s, dtype=torch.bool)
        allowed[:n_img, :n_img] = torch.eye(n_img, dtype=torch.bool)
        ref = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=allowed)[0, 2]
        clean = o[0, 2]
        expect = clean.clone()
        expect[:n_img] = (1 - u) * clean[:n_img] + u * ref[:n_img]
        torch.testing.assert_close(o[1, 2], expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o[1, 2, n_img:], clean[n_img:], rtol=0, atol=1e-6)  # text rows untouched


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_image_identity_function_with_masks(mask_kind):
    g = torch.Generator().manual_seed(0)
    b, h, n_img, n_txt, d = 2, 3, 5, 4, 8
    s = n_img + n_txt
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool)
    keep[0, ..., -1] = False  # a padded text token in sample 0 (text last)
    mask = None if mask_kind is None else keep if mask_kind == "bool" else \
        torch.zeros(b, 1, 1, s).masked_fill(~keep, float("-inf"))
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:n_img, :n_img] = torch.eye(n_img, dtype=torch.bool)
    allowed[:, n_img:] = True
    full = allowed & keep if mask is not None else allowed.expand(b, 1, s, s)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full)[:, :, :n_img]
    m = None if mask is None else mask.expand(b, h, s, s)
    out = image_identity(q, k, v, m, None, (n_img, s), (0, n_img))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_image_identity_runs_with_a_text_padding_mask(transformers):
    model = transformers("hunyuan_video")  # joint attention, text last, padded text keys masked
    inputs = transformer_inputs("hunyuan_video")
    ref = forward(model, inputs)
    outs = {}
    for mode in ("joint_identity", "image_identity"):
        with mmeff.apply(model, SoftPAG(layers=(0, 1), mode=mode)):
            outs[mode] = forward(model, inputs)
        assert torch.isfinite(outs[mode]).all() and not torch.equal(outs[mode], ref)
    assert not torch.allclose(outs["joint_identity"], outs["image_identity"])


def test_image_identity_on_image_only_attention_is_identity(transformers):
    model = transformers("pixart")
    inputs = transformer_inputs("pixart")
    outs = []
    for mode in ("joint_identity", "image_identity"):
        with mmeff.apply(model, SoftPAG(heads="0.0;1.2", mode=mode)):
            outs.append(forward(model, inputs))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------- guidance formula
@dataclasses.dataclass(frozen=True)
class PerturbAll(MethodConfig):
    """Independent re-implementation of the perturbed model: identity on given heads, every row."""

    name: ClassVar[str] = "test_perturb_all"
    kind: ClassVar[str] = "dit_attention"
    heads: tuple = ()

    def make_runtime(self, info):
        sel: dict[int, list[int]] = {}
        for l, h in self.heads:
            sel.setdefault(l, []).append(h)

        class Runtime(AttentionRuntime):
            def wants(self, site):
                return site.primary and site.layer in sel

            def __call__(self, ctx, q, k, v, attn_mask, scale):
                out = ctx.attend(q, k, v, attn_mask, scale).clone()
                out[:, sel[ctx.layer]] = v[:, sel[ctx.layer]]
                return out
        return Runtime()


def _record_calls(pipe, family: str, **kw: Any) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Transformer kwargs of every call and the prediction handed to the scheduler, for one generation."""
    calls: list[dict[str, Any]] = []
    preds: list[torch.Tensor] = []

    def pre(mod, args, kwargs):
        calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
    handle = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    original = pipe.scheduler.step

    def step(model_output, *a, **k):
        preds.append(model_output.clone())
        return original(model_output, *a, **k)
    pipe.scheduler.step = step
    try:
        generate(pipe, family, steps=1, **kw)
    finally:
        handle.remove()
        del pipe.scheduler.step
    return calls, preds


def _eps(model: torch.nn.Module, kw: dict[str, Any], rows: slice | None = None) -> torch.Tensor:
    kw = dict(kw)
    if rows is not None:
        for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            kw[key] = kw[key][rows]
    kw["return_dict"] = False
    with torch.no_grad():
        return model(**kw)[0]


@pytest.mark.parametrize("family,cfg", [("sd3", 4.0), ("sd3", 1.0), ("flux", 2.5), ("wan", 3.0)])
def test_guidance_formula(pipes, family, cfg):
    pipe, w, heads = pipes(family), 2.0, ((0, 1), (1, 0))
    calls, _ = _record_calls(pipe, family, cfg=cfg)
    with mmeff.apply(pipe, SoftPAG(heads="0.1;1.0", u=1.0, scale=w)):
        _, preds = _record_calls(pipe, family, cfg=cfg)
    final = preds[0]
    model = pipe.transformer
    if family == "sd3" and cfg > 1:
        assert len(calls) == 1
        uncond_cond = _eps(model, calls[0])
        eps_u, eps_c = uncond_cond.chunk(2)
        cond_rows = slice(1, 2)
        cond_kw = calls[0]
    elif family == "sd3":
        eps_c, eps_u, cond_rows, cond_kw = _eps(model, calls[0]), None, None, calls[0]
    else:
        assert len(calls) == 2  # sequential CFG: cond, then uncond
        eps_c, eps_u = _eps(model, calls[0]), _eps(model, calls[1])
        cond_rows, cond_kw = None, calls[0]
    with mmeff.apply(model, PerturbAll(heads=heads)):
        eps_p = _eps(model, cond_kw, cond_rows)
    if eps_u is None:
        expect = eps_c + w * (eps_c - eps_p)
    else:
        expect = eps_u + cfg * (eps_c - eps_u) + w * (eps_c - eps_p)
    torch.testing.assert_close(final, expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(final, expect - w * (eps_c - eps_p))  # the guidance term is really there


def test_start_stop_select_steps(pipes):
    pipe = pipes("sd3")
    for start, stop, expect in ((0.0, 1.0, 2), (0.5, 1.0, 1), (0.0, 0.5, 1)):
        with mmeff.apply(pipe, SoftPAG(heads="0.0", start=start, stop=stop)) as h:
            generate(pipe, "sd3", steps=2)
            assert h.report()["branch_calls"] == expect


# ---------------------------------------------------------------------------------------------- config
def test_spec_string_and_report(pipes):
    pipe = pipes("sd3")
    with mmeff.apply(pipe, "softpag:heads=0.1;1.2,u=0.5,scale=2,mode=image_identity") as h:
        generate(pipe, "sd3", steps=1)
        rep = h.report()
    sp = rep["per_method"]["softpag"]
    assert sp["heads"] == ["0.1", "1.2"] and sp["u"] == 0.5 and sp["mode"] == "image_identity"
    assert sp["perturbed_attention_calls"] == 2 and sp["method_seconds"] > 0
    assert rep["methods"][0]["heads"] == ("0.1", "1.2")


def test_head_spellings():
    a = SoftPAG(heads=[(1, 2), (0, 3)])
    assert a.heads == ("0.3", "1.2")
    assert SoftPAG(heads="1.2;0.3").heads == a.heads == SoftPAG(heads=("1,2", "0:3")).heads
    assert SoftPAG(layers=2).layers == (2,)
    assert mmeff.parse_method(a.spec()) == a


@pytest.mark.parametrize("kwargs,match", [
    ({}, "say which heads"),
    ({"heads": "0.0", "u": 1.5}, "u must be in"),
    ({"heads": "zero"}, "cannot read head"),
    ({"heads": "0.0", "start": 0.6, "stop": 0.5}, "start < stop"),
    ({"heads": "0.0", "mode": "bogus"}, "mode must be"),
    ({"preset": "no-such-preset"}, "neither a file nor a named preset"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SoftPAG(**kwargs)


def test_apply_errors_leave_nothing_behind(pipes, transformers):
    pipe = pipes("sd3")
    before = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")}
    for cfg, match in ((SoftPAG(layers=(5,)), "layer 5 does not exist"),
                       (SoftPAG(heads="0.9"), "layer 0 has heads 0..3")):
        with pytest.raises(ConfigError, match=match):
            mmeff.apply(pipe, cfg)
    after = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")}
    assert all(after[n] is p for n, p in before.items())
    assert not pipe.transformer._forward_pre_hooks and mmeff.core.active_handle(pipe) is None
    with pytest.raises(ConfigError, match="start/stop"):
        mmeff.apply(transformers("sd3"), SoftPAG(heads="0.0", start=0.2))
    with pytest.raises(ConfigError, match="one guidance method"):
        mmeff.apply(pipe, SoftPAG(heads="0.0"), SoftPAG(heads="1.0"))


def test_presets_json_and_headhunter_text(tmp_path):
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"heads": ["1,2", "0,3"]}))
    txt = tmp_path / "final_perturb_heads.txt"
    txt.write_text("1,2\n0,3\n")
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps(["1,2", "0,3"]))
    for path in (js, txt, lst):
        assert load_preset(str(path)) == ((0, 3), (1, 2))
        assert SoftPAG(preset=str(path)).head_pairs() == ((0, 3), (1, 2))
    assert SoftPAG(preset=str(js), heads="1.1").head_pairs() == ((0, 3), (1, 1), (1, 2))
