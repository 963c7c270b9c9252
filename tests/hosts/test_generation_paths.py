"""Every transformers generation path under pruning: two ways of generating the same thing must agree.

The pruning decision belongs to the prompt (docs/generation-contract.md). A forward that continues the last
pruned prompt reuses that decision, so these must be equal under pruning exactly as they are without it:
cached == ``use_cache=False`` == continued from ``past_key_values`` == one call, and assisted / prompt-lookup
decoding == plain greedy decoding. Paths that cannot be exact yet raise one IncompatibleFeatureError.
Run on LLaVA and Qwen2-VL (tiny random models) with a pre-LLM pruner (random) and in-LLM ones (FastV, EntropyPrune).
"""
from __future__ import annotations

import copy

import pytest
import torch

import mmeff
from mmeff import ConfigError, IncompatibleFeatureError
from mmeff.zoo import tiny_models as tm

from .conftest import generate, inputs_for, n_hooks

FAMILIES = ["llava", "qwen2_vl"]
ALL_FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]  # the core equalities, on every family
SPECS = ["random:ratio=0.5", "fastv:ratio=0.5,layer=1", "entropyprune:ratio=0.5,layer=1"]
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def _same(a, b, atol=2e-5):
    (ta, la), (tb, lb) = a, b
    assert torch.equal(ta, tb), f"tokens differ:\n{ta.tolist()}\n{tb.tolist()}"
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-4)


def _assistant(family):
    """A smaller, differently seeded model of the same family and vocabulary (drafts are partly rejected)."""
    return tm.tiny_llava("sdpa", 2, seed=1) if family == "llava" else tm.tiny_qwen2_vl("sdpa", 2, seed=1)


def _text_only(inputs):
    """The inputs without image tensors (the placeholders stay in the ids)."""
    return {k: v for k, v in inputs.items() if k not in IMAGE_KEYS + ("mm_token_type_ids",)}


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_use_cache_false_equals_cached(vlm, family, spec):
    """Every uncached step is a fresh forward of prompt + generated tokens: it must reuse the prompt's decision."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec) as h:
        cached = generate(model, inputs, n=5)
        uncached = generate(model, inputs, n=5, use_cache=False)
        assert h.report()["prompts"] == 2  # one decision per generate() call, none per uncached step
    _same(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_continued_from_cache_equals_one_call(vlm, family, spec):
    """generate(3) then generate(3 more) from its past_key_values == generate(6) (pre-LLM: cache shorter than ids)."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec):
        one_tokens, one_logits = generate(model, inputs, n=6)
        first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
        seq = first.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])], 1)
        tokens, logits = generate(model, {"input_ids": seq, "attention_mask": mask}, n=3,
                                  past_key_values=first.past_key_values)
    assert torch.equal(tokens, one_tokens)
    torch.testing.assert_close(torch.cat([torch.stack(first.logits, 1), logits], 1), one_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_next_turn_from_cache_equals_whole_conversation_uncached(vlm, family, spec):
    """A second chat turn on the reused cache == the whole conversation run again without a cache.

    Both continue the first turn's prompt, so both keep its decision; without the fix, pre-LLM pruning re-fed the
    last L - L' cached tokens into the cache a second time and the answer silently changed.
    """
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    turn = torch.tensor([[7, 8, 9]] * 2)
    with mmeff.apply(model, spec) as h:
        first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True)
        seq = torch.cat([first.sequences, turn], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])], 1)
        cache = copy.deepcopy(first.past_key_values)
        continued = generate(model, {"input_ids": seq, "attention_mask": mask}, n=4,
                             past_key_values=first.past_key_values)
        # only the tokens the cache lacks (the last generated one and the new turn), with the full mask
        only_new = generate(model, {"input_ids": seq[:, -(turn.shape[1] + 1):], "attention_mask": mask}, n=4,
                            past_key_values=cache)
        whole = {**inputs, "input_ids": seq, "attention_mask": mask}
        if "mm_token_type_ids" in inputs:
            tt = inputs["mm_token_type_ids"]
            whole["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(2, seq.shape[1] - tt.shape[1])], 1)
        again = generate(model, whole, n=4, use_cache=False)
        assert h.report()["prompts"] == 1
    _same(continued, again)
    assert torch.equal(only_new[0][:, -4:], continued[0][:, -4:])
    torch.testing.assert_close(only_new[1], continued[1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_assisted_and_prompt_lookup_equal_greedy(vlm, family, spec):
    """Drafts never reach the decision, and cropping rejected drafts leaves the pruned cache consistent."""
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    assistant = _assistant(family)
    with mmeff.apply(model, spec) as h:
        greedy = generate(model, inputs, n=8)
        kept = h.report()["kept_visual_index"]
        lookup = generate(model, inputs, n=8, prompt_lookup_num_tokens=3)
        assert h.report()["kept_visual_index"] == kept
        assisted = generate(model, inputs, n=8, assistant_model=assistant)
        assert h.report()["kept_visual_index"] == kept
    _same(greedy, lookup)
    _same(greedy, assisted)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["fastv:ratio=0.5,layer=1", "entropyprune:ratio=0.5,layer=1"])
def test_pruned_assistant_in_llm_equals_its_own_greedy(vlm, family, spec):
    """An in-LLM pruned assistant only proposes drafts: the main model's answer is unchanged."""
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    assistant = _assistant(family)
    with mmeff.apply(model, spec), mmeff.apply(assistant, spec):
        greedy = generate(model, inputs, n=6)
        assisted = generate(model, inputs, n=6, assistant_model=assistant)
    _same(greedy, assisted)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_beam_search_and_sampling_cached_equal_uncached(vlm, family, spec):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec):
        runs = []
        for use_cache in (True, False):
            beams = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=3,
                                   num_return_sequences=2, do_sample=False, use_cache=use_cache,
                                   return_dict_in_generate=True, output_scores=True)
            torch.manual_seed(0)
            sampled = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=0,
                                     num_return_sequences=2, use_cache=use_cache)
            runs.append((beams.sequences, beams.sequences_scores, sampled))
    (b1, s1, x1), (b2, s2, x2) = runs
    assert torch.equal(b1, b2)
    torch.testing.assert_close(s1, s2, atol=2e-5, rtol=1e-4)
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("spec", SPECS)
def test_qwen_without_mm_token_type_ids_and_explicit_3d_positions(vlm, spec):
    """Unpadded Qwen input with explicit 3-D M-RoPE positions needs no mm_token_type_ids (transformers does not)."""
    model = vlm("qwen2_vl")
    inputs = inputs_for(model, n=1)
    pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    bare = {k: v for k, v in inputs.items() if k not in ("mm_token_type_ids", "attention_mask")}
    with mmeff.apply(model, spec):
        ref = model(**inputs).logits
        explicit = model(**bare, position_ids=pos).logits
        ref_gen = generate(model, inputs, n=4)
        bare_gen = generate(model, bare, n=4, position_ids=pos)
    torch.testing.assert_close(explicit, ref, atol=2e-5, rtol=1e-4)
    _same(ref_gen, bare_gen)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_unsupported_paths_fail_with_one_clear_error(vlm, family, spec):
    """Chunked prefill, offloaded caches, inputs_embeds alone and a new image on a pruned cache: clear, harmless."""
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    ref = generate(model, inputs, n=3)
    with mmeff.apply(model, spec):
        pruned = generate(model, inputs, n=3)
        with pytest.raises(IncompatibleFeatureError, match="prefill_chunk_size"):
            generate(model, inputs, n=3, prefill_chunk_size=4)
        with pytest.raises(IncompatibleFeatureError, match="offloaded_static"):
            generate(model, inputs, n=3, cache_implementation="offloaded_static")
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ConfigError, match="not inputs_embeds alone"):
            model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=2)
        out = model(**inputs, use_cache=True)
        second_turn = {**inputs, "attention_mask": torch.ones(1, 2 * inputs["input_ids"].shape[1], dtype=torch.long)}
        with pytest.raises(IncompatibleFeatureError, match="new image tokens"):
            model(**second_turn, past_key_values=out.past_key_values)
        with pytest.raises(IncompatibleFeatureError, match="pruned rows"):
            model(input_ids=torch.tensor([[7], [8]]), past_key_values=out.past_key_values)
        if spec.startswith("random"):  # two prompts packed in one row: restarting positions, no mask
            ids = inputs["input_ids"]
            packed = {k: v for k, v in inputs.items() if k not in ("attention_mask", "mm_token_type_ids")}
            packed["position_ids"] = torch.cat([torch.arange(5), torch.arange(ids.shape[1] - 5)])[None]
            if family.startswith("qwen"):
                packed["position_ids"] = packed["position_ids"][None].expand(4, 1, -1)
            with pytest.raises(IncompatibleFeatureError, match="packed sequences"):
                model(**packed)
        assert torch.equal(generate(model, inputs, n=3)[0], pruned[0])  # still works after every refusal
    assert n_hooks(model) == 0 and "generate" not in model.__dict__
    _same(generate(model, inputs, n=3), ref, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_pruned_assistant_is_refused(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    assistant = _assistant(family)
    with mmeff.apply(assistant, "random:ratio=0.5"), pytest.raises(IncompatibleFeatureError, match="assistant model"):
        generate(model, inputs, n=4, assistant_model=assistant)


def test_random_pre_llm_needs_no_pixel_values(vlm):
    """A pre-LLM pruner that scores no features prunes placeholders without images, as transformers embeds them."""
    model = vlm("llava")
    inputs = _text_only(inputs_for(model, n=2))
    method = mmeff.parse_method("random:ratio=0.5")
    with mmeff.apply(model, method) as h:
        tokens, logits = generate(model, inputs, n=3)
        kept = h.report()["kept_visual_index"]
    # the same decision, applied by hand: drop the placeholders random did not keep, then run the stock model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vis = ids == model.config.image_token_id
    keep = torch.ones_like(ids, dtype=torch.bool)
    rows = []
    for b in range(2):
        pos = vis[b].nonzero().flatten()
        drop = torch.ones(pos.numel(), dtype=torch.bool)
        drop[kept[b]] = False
        keep[b, pos[drop]] = False
        rows.append(keep[b].nonzero().flatten())
    for b in range(2):
        solo = {"input_ids": ids[b:b + 1, rows[b]], "attention_mask": mask[b:b + 1, rows[b]]}
        solo["position_ids"] = (mask[b:b + 1].cumsum(-1) - 1).clamp_min(0)[:, rows[b]]
        real = solo["attention_mask"].bool()[0]
        solo = {k: v[:, real] for k, v in solo.items()}
        out = model.generate(**solo, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[0, -3:], tokens[b, -3:])
        torch.testing.assert_close(torch.stack(out.logits, 1)[0], logits[b], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["random:ratio=0.5", "fastv:ratio=0.5,layer=1"])
def test_torch_compile_prefill_breaks_only_at_the_decision_or_says_why_not(vlm, spec):
    """torch.compile(model): a new prompt is read eagerly at one graph break (exact); fullgraph=True names it."""
    model = vlm("llava")
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec):
        eager = model(**inputs).logits
        try:
            with pytest.raises(Exception, match="mmeff reads a new prompt eagerly"):
                torch.compile(model, backend="eager", fullgraph=True)(**inputs)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="eager")(**inputs).logits
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_next_turn_without_attention_mask(vlm, family, spec):
    """Unpadded chat without a mask: the re-fed tokens are found from the positions generate() passes."""
    model = vlm(family)
    inputs = {k: v for k, v in inputs_for(model, n=1).items() if k != "attention_mask"}
    turn = torch.tensor([[7, 8, 9]])
    with mmeff.apply(model, spec):
        first = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               return_dict_in_generate=True)
        seq = torch.cat([first.sequences, turn], 1)
        continued = generate(model, {"input_ids": seq}, n=4, past_key_values=first.past_key_values)
        whole = {**inputs, "input_ids": seq}
        if "mm_token_type_ids" in inputs:
            tt = inputs["mm_token_type_ids"]
            whole["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(1, seq.shape[1] - tt.shape[1])], 1)
        again = generate(model, whole, n=4, use_cache=False)
    _same(continued, again)
