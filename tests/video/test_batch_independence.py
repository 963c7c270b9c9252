"""Batch independence (DESIGN contract): a sample's sparse-attention decision and output do not depend
on the other samples of its batch.

Each check runs a batch of different samples (different latents / q, k, v, text embeddings, scales and,
where the model takes a text mask, different valid text lengths) and compares every sample with the same
sample run alone under the same method. ``test_*_check_catches_shared_selection`` patch in the classic
bug (one selection shared by the batch) and confirm the comparison fails on it.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import mmeff
from mmeff.core.config import MethodConfig
from mmeff.kernels.block_sparse_attn import block_mean
from mmeff.video import RectifiedSpaAttn, VMoBA, rectified_core, vmoba_core
from mmeff.video.rectified_core import rectified_sparse_attention
from mmeff.video.vmoba_core import chunk_gates, select_chunks, vmoba_attention
from mmeff.video.vmoba_partition import chunk_starts, partition_order
from mmeff.zoo.tiny_pipelines import tiny_transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for this module (fast on a shared 2-core machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BATCH = 3
RTOL = 1e-5  # of each sample's output scale (max |x|), fp32


def _close(batched: torch.Tensor, alone: torch.Tensor) -> bool:
    """``batched`` matches ``alone`` to ``RTOL`` of the output scale."""
    tol = RTOL * float(alone.abs().max().clamp_min(1e-6))
    return bool((batched - alone).abs().max() <= tol)


def _assert_per_sample(batched: torch.Tensor, alone: list[torch.Tensor], what: str) -> None:
    for b, ref in enumerate(alone):
        err = float((batched[b:b + 1] - ref).abs().max())
        assert _close(batched[b:b + 1], ref), f"{what}: sample {b} differs from its batch-1 run by {err:.3g}"
    # the samples really differ, so a shared decision would show
    assert not _close(alone[0], alone[1]), f"{what}: samples 0 and 1 are too similar to test anything"


# ----------------------------------------------------------------------------- whole transformers

def _inputs(family: str) -> dict:
    """A batch of ``BATCH`` different samples, same timestep; HunyuanVideo with valid text lengths 6, 8, 3."""
    g = torch.Generator().manual_seed(1)
    amp = torch.tensor([1.0, 2.5, 0.4])  # per-sample scale: makes any pooling over the batch visible

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(BATCH, *shape, generator=g) * amp.view(-1, *[1] * len(shape))

    t = torch.full((BATCH,), 500)
    if family == "wan":  # grid 4 x 8 x 8
        return {"hidden_states": rand(16, 4, 16, 16), "timestep": t, "encoder_hidden_states": rand(8, 32)}
    if family == "hunyuan_video":  # grid 4 x 8 x 8, text last, padded text per sample
        mask = (torch.arange(8)[None] < torch.tensor([6, 8, 3])[:, None]).long()
        return {"hidden_states": rand(4, 4, 8, 8), "timestep": t, "encoder_hidden_states": rand(8, 16),
                "encoder_attention_mask": mask, "pooled_projections": rand(8),
                "guidance": torch.full((BATCH,), 1000.0)}
    # CogVideoX: grid 4 x 8 x 8, text first
    return {"hidden_states": rand(4, 4, 16, 16), "timestep": t, "encoder_hidden_states": rand(16, 32)}


def _forward(model: torch.nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def _batched_and_alone(model: torch.nn.Module, family: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    kw = _inputs(family)
    alone = [_forward(model, {k: v[b:b + 1] for k, v in kw.items()}) for b in range(BATCH)]
    return _forward(model, kw), alone


METHODS: dict[str, Callable[[], MethodConfig]] = {
    "rectified": lambda: RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none", warmup_steps=0,
                                          dense_layers=()),
    "vmoba_topk": lambda: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk",
                                topk=(2, 2, 2), first_full_layer=0),
    "vmoba_head_global": lambda: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4",
                                       mode="threshold", threshold=0.25, threshold_type="head_global",
                                       first_full_layer=0),
}

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = tiny_transformer(family)
    return _MODELS[family]


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox"])
@pytest.mark.parametrize("method", list(METHODS))
def test_transformer_output_per_sample_equals_batch(family: str, method: str) -> None:
    model = _model(family)
    dense, _ = _batched_and_alone(model, family)
    with mmeff.apply(model, METHODS[method]()) as h:
        batched, alone = _batched_and_alone(model, family)
    rep = h.report()["per_method"][METHODS[method]().name]
    assert rep["calls"]["sparse"] > 0 and max(rep["sparsity_per_layer"].values()) > 0.2, rep
    assert not _close(batched, dense)  # the method really changed the output
    _assert_per_sample(batched, alone, f"{family}/{method}")


# ----------------------------------------------------------------------------- core functions

def _qkv(seq: int, d: int = 16, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``BATCH`` different samples with block structure (so pooled scores matter) and per-sample scales."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.tensor([1.0, 3.0, 0.5]).view(-1, 1, 1, 1)
    blk = torch.arange(seq) // 8
    return tuple((torch.randn(BATCH, heads, int(blk[-1]) + 1, d, generator=g)[:, :, blk]
                  + 0.5 * torch.randn(BATCH, heads, seq, d, generator=g)) * amp for _ in range(3))


# (n_visual, text_len, text_position, valid text lengths): fused path, ragged two-call path, text first
RECT_CASES = [(64, 0, "last", None), (64, 8, "last", [8, 3, 5]), (60, 8, "last", [2, 8, 0]),
              (64, 6, "first", [6, 1, 4])]


def _rectified(q, k, v, n_visual: int, text_len: int, pos: str, valid) -> tuple[torch.Tensor, torch.Tensor]:
    out, st = rectified_sparse_attention(
        q, k, v, n_visual=n_visual, text_len=text_len, text_valid_len=valid, block=8, drop=0.75, tau=0.2,
        first_frame_blocks=1, text_position=pos, return_stats=True)
    return out, st.block_mask


@pytest.mark.parametrize("case", RECT_CASES, ids=lambda c: f"{c[0]}v{c[1]}t-{c[2]}")
def test_rectified_core_per_sample_equals_batch(case: tuple) -> None:
    n_visual, text_len, pos, valid = case
    q, k, v = _qkv(n_visual + text_len)
    tv = None if valid is None else torch.tensor(valid)
    out, sel = _rectified(q, k, v, n_visual, text_len, pos, tv)
    assert not bool(sel.all())  # blocks really dropped
    alone = []
    for b in range(BATCH):
        o, s = _rectified(q[b:b + 1], k[b:b + 1], v[b:b + 1], n_visual, text_len, pos,
                          None if valid is None else int(valid[b]))
        assert torch.equal(sel[b:b + 1], s), f"sample {b}: block selection depends on the batch"
        alone.append(o)
    _assert_per_sample(out, alone, f"rectified core {case}")


VMOBA_MODES = [{"mode": "topk", "topk": 3, "threshold_type": "query_head"},
               {"mode": "topk", "topk": 3, "threshold_type": "head_global"},
               {"mode": "threshold", "threshold": 0.25, "threshold_type": "query_head"},
               {"mode": "threshold", "threshold": 0.25, "threshold_type": "head_global"}]


@pytest.mark.parametrize("kw", VMOBA_MODES, ids=lambda kw: f"{kw['mode']}-{kw['threshold_type']}")
def test_vmoba_core_per_sample_equals_batch(kw: dict) -> None:
    ids = partition_order(4, 4, 4, (2, 2, 2))[1]  # 8 cubes of 8 tokens
    q, k, v = _qkv(64, seed=1)
    cs = chunk_starts(ids)
    sel = select_chunks(chunk_gates(q, k, cs), ids, **kw)
    assert not bool(sel.all())
    out = vmoba_attention(q, k, v, chunk_ids=ids, **kw)
    alone = []
    for b in range(BATCH):
        s = select_chunks(chunk_gates(q[b:b + 1], k[b:b + 1], cs), ids, **kw)
        assert torch.equal(sel[b:b + 1], s), f"sample {b}: chunk selection depends on the batch"
        alone.append(vmoba_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], chunk_ids=ids, **kw))
    _assert_per_sample(out, alone, f"vmoba core {kw}")


# ----------------------------------------------------------------------------- the check can fail

def _shared_rectified_plan(real: Callable) -> Callable:
    """``plan_rectified`` with the bug under test: the selection of sample 0 used for the whole batch."""

    def plan(q_vis, k_vis, v_vis, k_txt, text_valid, **kw):
        p = real(q_vis, k_vis, v_vis, k_txt, text_valid, **kw)
        shared = p.block_mask[:1].expand_as(p.block_mask)
        rect = (~shared) & p.eligible if kw.get("gapr", True) else p.rectified
        row_add = None if p.row_add is None else torch.matmul(p.p_visual * rect, block_mean(v_vis, kw["block"]))
        row_scale = None if p.row_scale is None else 1.0 - (p.p_visual * rect).sum(-1)
        return type(p)(p.p_visual, p.p_text, shared, p.eligible, rect, row_scale, row_add)

    return plan


def test_rectified_check_catches_shared_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rectified_core, "plan_rectified", _shared_rectified_plan(rectified_core.plan_rectified))
    model = _model("wan")
    with mmeff.apply(model, METHODS["rectified"]()):
        batched, alone = _batched_and_alone(model, "wan")
    assert _close(batched[:1], alone[0])  # sample 0 is its own reference
    assert not all(_close(batched[b:b + 1], alone[b]) for b in range(1, BATCH))


def test_vmoba_check_catches_selection_pooled_over_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    real = vmoba_core.select_chunks
    monkeypatch.setattr(vmoba_core, "select_chunks",
                        lambda gates, qc, **kw: real(gates, qc, **kw).any(0, keepdim=True).expand(gates.shape))
    model = _model("wan")
    with mmeff.apply(model, METHODS["vmoba_topk"]()):
        batched, alone = _batched_and_alone(model, "wan")
    assert not all(_close(batched[b:b + 1], alone[b]) for b in range(BATCH))
