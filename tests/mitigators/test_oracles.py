"""Oracle tests: plain re-implementations of VHR's and GIFT's official rules agree with mmeff on the zoo models.

The oracles share no code with mmeff.mitigators: numpy for the rules, plain hooks / a registered eager
attention function for the model side, the chat template and tokenizer for the prompt layout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

import mmeff
from mmeff.mitigators import GIFT, VHR
from mmeff.zoo.load import load
from mmeff.zoo.processors import chat
from mmeff.zoo.world.questions import CAPTION_PROMPT
from mmeff.zoo.world.weak import render_weak, weak_scene, weak_seeds

N_NEW = 6


def _inputs(processor, question: str = CAPTION_PROMPT, seed_index: int = 0):
    image = render_weak(weak_scene(weak_seeds(seed_index + 1)[seed_index]))
    text = processor.apply_chat_template(chat(question), add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def _greedy(model, inputs):
    out = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


# ---------------------------------------------------------------------------------------------- VHR


def _vhr_oracle(model, inputs, alpha: float, layers: list[int]):
    """VHR, Algorithm 1, at batch 1: no-image pass, then numpy selection layer by layer, frozen after t=0."""
    lm = model.model.language_model
    n_heads = lm.config.num_attention_heads
    ids = inputs["input_ids"][0].tolist()
    text_only = torch.tensor([[t for t in ids if t != model.config.image_token_id]])
    captured, handles = {}, []
    for l in layers:
        handles.append(lm.layers[l].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: captured.__setitem__(l, a[0][0, -1].reshape(n_heads, -1).double().numpy())))
    with torch.no_grad():
        lm(input_ids=text_only)
    for h in handles:
        h.remove()
    scales, chosen = {}, {}

    def make(l):
        def hook(m, a):
            x = a[0]
            if l not in scales:  # t = 0: decide on the prompt's last position
                with_img = x[0, -1].reshape(n_heads, -1).double().numpy()
                no_img = captured[l]
                vhd = np.linalg.norm(with_img - no_img, axis=-1)
                ta = (no_img ** 2).sum(-1)
                vhd[(vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())] = 0.0
                sel = vhd > np.median(vhd)
                chosen[l] = sorted(int(i) for i in np.nonzero(sel)[0])
                scales[l] = torch.tensor(np.repeat(np.where(sel, alpha, 1.0), x.shape[-1] // n_heads), dtype=x.dtype)
            return (x * scales[l],)
        return hook

    handles = [lm.layers[l].self_attn.o_proj.register_forward_pre_hook(make(l)) for l in layers]
    try:
        tokens, logits = _greedy(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return tokens, logits, chosen


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_vhr_matches_plain_reimplementation_on_zoo_model(name):
    model, processor = load(name)
    inputs = _inputs(processor)
    layers = VHR().resolve_layers(len(model.model.language_model.layers))
    ref_tokens, ref_logits, ref_heads = _vhr_oracle(model, inputs, 2.0, list(layers))
    with mmeff.apply(model, VHR(alpha=2.0)) as handle:
        tokens, logits = _greedy(model, inputs)
        heads = handle.report()["steering"][0]["selected_heads"]
    assert {l: [h for _, h in v] for l, v in heads.items()} == ref_heads
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    dense_tokens, _ = _greedy(model, inputs)
    assert not torch.equal(ref_logits, _greedy(model, inputs)[1]) or not torch.equal(dense_tokens, ref_tokens)


# ---------------------------------------------------------------------------------------------- GIFT


class _GiftOracle:
    """GIFT's official rule inside an eager attention function (batch 1): saliency from the full prefill
    attention map of the saliency layer, then multiply-and-renormalise on the last row of each enhancement layer."""

    def __init__(self, lm_attention: type, sal: int, enh: set[int], alpha: float, vis: list[int], query: list[int],
                 informative: list[bool]):
        self.lm_attention, self.sal, self.enh, self.alpha = lm_attention, sal, enh, alpha
        self.vis, self.query, self.informative = vis, query, informative
        self.w: np.ndarray | None = None

    def saliency(self, probs: np.ndarray) -> None:
        rows = [self.query[0] - 1] + self.query
        a = probs[:, rows][:, :, self.vis]                        # [H, R+1, V]
        shift = np.maximum(a[:, 1:] - a[:, :-1], 0.0)
        keep = [i for i, f in enumerate(self.informative) if f] or list(range(len(self.query)))
        shift = shift[:, keep]
        heads = np.argsort(-shift.sum((1, 2)), kind="stable")[: probs.shape[0] // 2]
        s = shift[heads].mean((0, 1))
        s = np.clip(s, s.mean() - 3 * s.std(), s.mean() + 3 * s.std())
        s = (s - s.min()) / (s.max() - s.min())
        self.w = np.exp(self.alpha * s)

    def enhance(self, row: np.ndarray) -> np.ndarray:
        k = row.shape[0] // 2
        hv = np.argsort(-row[:, self.vis].sum(1), kind="stable")[:k]
        before = row[np.ix_(hv, self.vis)].sum()
        row[np.ix_(hv, self.vis)] *= self.w
        r = row[np.ix_(hv, self.vis)].sum() / before
        ht = np.argsort(-row[:, self.query].sum(1), kind="stable")[:k]
        row[np.ix_(ht, self.query)] *= r
        return row / row.sum(1, keepdims=True)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        logits = (query.double() @ key.double().transpose(-1, -2)) * scaling
        q_len, k_len = logits.shape[-2:]
        allowed = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
        if not getattr(module, "is_causal", True):
            allowed = torch.ones_like(allowed)
        if attention_mask is not None:
            m = attention_mask[..., :k_len]
            allowed = allowed & (m if m.dtype == torch.bool else m == 0)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        layer = module.layer_idx if type(module) is self.lm_attention else None  # the vision tower runs plain
        if q_len > 1 and layer == self.sal:
            self.saliency(probs[0].numpy())
        if layer in self.enh and self.w is not None:
            probs = probs.clone()
            probs[0, :, -1] = torch.from_numpy(self.enhance(probs[0, :, -1].numpy().copy()))
        out = probs.to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_gift_matches_plain_reimplementation_on_zoo_model(name):
    model, processor = load(name)
    inputs = _inputs(processor, "Is there a red circle in the image?")
    ids = inputs["input_ids"][0].tolist()
    vis = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    q_ids = processor.tokenizer("Is there a red circle in the image?", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(vis[-1], len(ids)) if ids[i:i + len(q_ids)] == q_ids)
    query = list(range(start, start + len(q_ids)))
    pieces = processor.tokenizer.convert_ids_to_tokens(q_ids)
    informative = [p.strip("▁").lower() in {"red", "circle", "image"} for p in pieces]
    sal, enh = GIFT().resolve(len(model.model.language_model.layers))
    oracle = _GiftOracle(type(model.model.language_model.layers[0].self_attn), sal[0], set(enh), 5.0, vis, query, informative)
    AttentionInterface.register("mmeff_gift_oracle", oracle.attention)
    ref_model, _ = load(name, attn_implementation="mmeff_gift_oracle")
    ref_tokens, ref_logits = _greedy(ref_model, inputs)
    with mmeff.apply(model, GIFT(alpha=5.0)) as handle:
        tokens, logits = _greedy(model, inputs)
        rep = handle.report()["steering"][0]
    assert rep["pos_tagger"].startswith("fallback") and rep["samples_without_informative_words"] == 0
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    dense_logits = _greedy(model, inputs)[1]
    assert (dense_logits - ref_logits).abs().max() > 1e-3  # the oracle really steers
