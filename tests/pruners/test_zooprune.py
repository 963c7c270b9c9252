"""ZOO-Prune: sensitivity estimators, SADS, host contracts on all four families (tiny random models, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch

import mmeff
from mmeff import ConfigError, MissingImageError, UnsupportedModelError
from mmeff.core.hooks import HookSet
from mmeff.hosts import projector_probe
from mmeff.hosts.llava import LlavaAdapter, LlavaNextAdapter
from mmeff.hosts.qwen_vl import Qwen25VLAdapter, QwenVLAdapter
from mmeff.pruners import ZOOPrune
from mmeff.pruners.sads import minmax, sads_select
from mmeff.pruners.zoo_sensitivity import draw_directions, projector_sensitivity
from tests.hosts.conftest import FAMILIES, generate, inputs_for, n_hooks
from tests.hosts.contract_checks import assert_cached_equals_slow_twin, take_sample

SPEC = "zooprune:ratio=0.5,directions=6"


def _rows_and_fn(model, adapter_cls, double: bool = True):
    """The projector rows of one image and the row-wise projector, in float64 on a copy of the model."""
    model = copy.deepcopy(model).double() if double else model
    adapter = adapter_cls(model)
    inputs = inputs_for(model, n=1)
    kw = {k: (v.double() if k == "pixel_values" else v) for k, v in inputs.items()}
    hooks = HookSet()
    recorder = projector_probe.ProjectorRecorder(adapter, hooks)
    with torch.no_grad():
        rows = recorder.rows(adapter.image_features(kw))
    hooks.remove()
    return rows[0].rows, projector_probe.projector_fn(adapter)


@pytest.mark.parametrize("family,adapter", [("llava", LlavaAdapter), ("qwen2_vl", QwenVLAdapter)])
def test_finite_differences_converge_to_the_jvp(vlm, family, adapter):
    """Same directions: |S_fd(h) - S_jvp| shrinks like h^2 (the Qwen merger has a LayerNorm: not affine)."""
    x, fn = _rows_and_fn(vlm(family), adapter)
    u = draw_directions(torch.Generator().manual_seed(0), 5, x.shape[-1]).double()
    jvp = projector_sensitivity(fn, x, u, estimator="jvp")
    errors = [float((projector_sensitivity(fn, x, u, step=h, estimator="fd") - jvp).abs().max())
              for h in (3.0, 0.3, 0.03, 0.003)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-5 * float(jvp.abs().max())
    assert errors[0] > 1e-4 * float(jvp.abs().max())  # the check is sensitive: a large step is visibly off


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_jvp_equals_the_generic_jvp(vlm, family):
    """The MLP-structured JVP (primal once per token) is the generic torch.func.jvp to rounding, on all hosts."""
    adapter_cls = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "qwen2_vl": QwenVLAdapter,
                   "qwen2_5_vl": Qwen25VLAdapter}[family]
    x, fn = _rows_and_fn(vlm(family), adapter_cls)
    assert fn.first is not None and (fn.pre is None) == family.startswith("llava")
    u = draw_directions(torch.Generator().manual_seed(3), 7, x.shape[-1]).double()
    generic = projector_sensitivity(lambda r: fn(r), x, u, estimator="jvp", chunk=37)
    for chunk in (5, 10_000):
        torch.testing.assert_close(projector_sensitivity(fn, x, u, estimator="jvp", chunk=chunk), generic,
                                   rtol=1e-10, atol=1e-12)


def test_sensitivity_is_chunk_invariant_and_matches_explicit_jacobian(vlm):
    x, fn = _rows_and_fn(vlm("qwen2_vl"), QwenVLAdapter)
    x = x[:5]
    u = draw_directions(torch.Generator().manual_seed(1), 4, x.shape[-1], kind="gaussian").double()
    full = projector_sensitivity(fn, x, u, chunk=10_000)
    for chunk in (1, 3, 7):
        torch.testing.assert_close(projector_sensitivity(fn, x, u, chunk=chunk), full)
    # plain definition: (1/m) sum_j ||J(x_i) u_j|| with the Jacobian written out
    for i in (0, x.shape[0] - 1):
        jac = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0], x[i])
        ref = (u @ jac.T).norm(dim=-1).mean()
        torch.testing.assert_close(full[i], ref)


def test_directions_unit_or_gaussian():
    def g():
        return torch.Generator().manual_seed(3)

    unit, gauss = draw_directions(g(), 8, 32, "unit"), draw_directions(g(), 8, 32, "gaussian")
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(unit, gauss / gauss.norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="unit"):
        draw_directions(g(), 2, 4, "sphere")


def test_sads_greedy_by_hand():
    # token 0 most sensitive; token 1 is a copy of 0's direction (distance 0), token 2 orthogonal, token 3 opposite
    sens = torch.tensor([4.0, 3.0, 1.5, 1.0])
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # S_hat = [1, 2/3, 1/6, 0]; after picking 0: min D = [0, 0, 1, 2] -> gains [.., 0, 1/6, 0] -> pick 2;
    # then min D with 2 = [.., 0, .., 1] (token 3: min(2, 1)) -> gains [.., 0, .., 0]: a tie at 0 -> first index 1
    assert sads_select(sens, feats, 3).tolist() == [0, 2, 1]
    assert minmax(torch.tensor([2.0, 2.0])).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_exact_and_remove_restores(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    ref = generate(model, inputs)
    with mmeff.apply(model, ZOOPrune(ratio=1.0, directions=4)):
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref[0]) and torch.equal(logits, ref[1])
    h = mmeff.apply(model, SPEC)
    pruned = generate(model, inputs)
    assert not torch.equal(pruned[1], ref[1])
    h.remove()
    assert n_hooks(model) == 0 and model.model.__dict__.get("_forward_pre_hooks", {}) == {}
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref[0]) and torch.equal(logits, ref[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_alone(vlm, family):
    model = vlm(family)
    batch = inputs_for(model, n=3)
    with mmeff.apply(model, SPEC) as h:
        tokens, logits = generate(model, batch)
        kept = [list(k) for k in h.report()["kept_visual_index"]]
        for i in range(3):
            one = take_sample(inputs_for(model, n=3), i, model)
            t1, l1 = generate(model, one)
            assert [list(k) for k in h.report()["kept_visual_index"]] == [kept[i]], f"sample {i}: other tokens"
            n_new = t1.shape[1] - one["input_ids"].shape[1]
            assert torch.equal(tokens[i, -n_new:], t1[0, -n_new:])
            torch.testing.assert_close(logits[i], l1[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_uncached_twin(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    method = mmeff.parse_method(SPEC)
    assert_cached_equals_slow_twin(model, inputs, method, 5)


def test_seeded_reproducible_and_estimators_agree(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=2)

    def kept(spec):
        with mmeff.apply(model, spec) as h, torch.no_grad():
            model(**inputs)
            return [list(k) for k in h.report()["kept_visual_index"]]

    base = kept("zooprune:ratio=0.4,directions=3,seed=5")
    assert kept("zooprune:ratio=0.4,directions=3,seed=5") == base
    assert kept("zooprune:ratio=0.4,directions=3,seed=5,estimator=fd,step=0.001") == base
    assert kept("zooprune:ratio=0.4,directions=3,seed=5,chunk=5") == base
    others = [kept(f"zooprune:ratio=0.4,directions=3,seed={s}") for s in range(6, 10)]
    assert any(o != base for o in others)  # the directions matter with m=3


def test_clear_errors_and_nothing_half_applied(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    for bad, cause in [("zooprune:ratio=0.5,directions=0", "directions"), ("zooprune:ratio=0.5,step=0", "step"),
                       ("zooprune:ratio=0.5,estimator=adam", "estimator"),
                       ("zooprune:ratio=0.5,direction_kind=sphere", "direction_kind"),
                       ("zooprune:ratio=0.5,layer=2", "before the LLM")]:
        with pytest.raises(ConfigError, match=cause):
            mmeff.apply(model, bad)
        assert n_hooks(model) == 0
    with torch.no_grad():  # encoded before the pruner was applied: its projector input was never seen
        early = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with mmeff.apply(model, SPEC), torch.no_grad():
        with pytest.raises(MissingImageError, match="pixel_values"):
            model(**no_pixels)
        with pytest.raises(UnsupportedModelError, match="projector did not run"):
            model(**no_pixels, mm_encoder_outputs={"image": early})
        model(**inputs)  # still works after the errors
        late = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        model(**no_pixels, mm_encoder_outputs={"image": late})  # what generate() does: encoded while applied
    assert n_hooks(model) == 0
