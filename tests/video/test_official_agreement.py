"""mmeff's video sparse attention against plain float64 re-implementations of the official code.

The oracles live in ``official_oracle.py``. Inputs are small local-attention grids (q/k built from
positional features of a (T, H, W) latent grid plus noise, so nearby tokens attend to each other,
as in a video DiT). With the official options selected (VMoBA ``budget_scope="batch"``, Rectified
SpaAttn ``floor="joint"``) our ops must agree to 1e-5 relative and pick the same blocks / chunks;
with the defaults they differ exactly where docs/video-sparse-attention-variants.md says.

The Triton router's half runs in one worker subprocess (``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

try:
    from ..kernels.triton_worker import run_worker
    from .official_oracle import (
        official_rectified,
        official_vmoba,
        official_vmoba_selection,
    )
except ImportError:  # executed as the worker script
    run_worker = None
    from official_oracle import (  # type: ignore
        official_rectified,
        official_vmoba,
        official_vmoba_selection,
    )

import mmeff.kernels.chunk_routing as routing
from mmeff.video.layout import block_neighbours, gilbert_order
from mmeff.video.rectified_core import rectified_sparse_attention, top_k_blocks
from mmeff.video.vmoba_core import (
    apply_dense_fallback,
    chunk_gates,
    select_chunks,
    vmoba_attention,
    vmoba_reference,
)
from mmeff.video.vmoba_partition import chunk_starts, partition_order

REL_TOL = 1e-5
GRID = (4, 8, 8)  # latent T, H, W: 256 tokens


def local_qkv(grid: tuple[int, int, int], *, batch: int = 2, heads: int = 2, dim: int = 16, seed: int = 0,
              noise: float = 0.4, sharpness: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, S, D]`` in raster order whose q·k decays with grid distance (local attention)."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).float()
    freqs = torch.randn(heads, 3, dim // 2, generator=gen) * 0.6
    angles = pos @ freqs  # [H, S, D/2]
    feat = torch.cat([angles.cos(), angles.sin()], -1) / (dim // 2) ** 0.5 * dim ** 0.5
    q = sharpness * feat + noise * torch.randn(batch, heads, pos.shape[0], dim, generator=gen)
    k = feat + noise * torch.randn(batch, heads, pos.shape[0], dim, generator=gen)
    v = torch.randn(batch, heads, pos.shape[0], dim, generator=gen)
    return q, k, v


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


# ============================================================================= VMoBA

PARTITIONS = {"1d_frame": 1, "2d_tile": (2, 2), "3d_cube": (2, 2, 2)}  # 4, 16 and 32 chunks per sample
SELECTIONS = {
    "tau0": {"mode": "threshold", "threshold": 0.0},
    "tau0.1": {"mode": "threshold", "threshold": 0.1},
    "tau0.25": {"mode": "threshold", "threshold": 0.25},
    "tau0.6": {"mode": "threshold", "threshold": 0.6},
    "tau1.5": {"mode": "threshold", "threshold": 1.5},
    "top1": {"mode": "topk", "topk": 1},
    "top2": {"mode": "topk", "topk": 2},
    "top3": {"mode": "topk", "topk": 3},
}


def vmoba_case(partition: str, batch: int, seed: int = 1) -> tuple[tuple, torch.Tensor, int]:
    """Tokens in chunk order, the chunk ids and the (uniform) chunk size."""
    q, k, v = local_qkv(GRID, batch=batch, seed=seed)
    perm, ids, n_chunks = partition_order(*GRID, PARTITIONS[partition])
    size = ids.numel() // n_chunks
    assert bool((ids.bincount() == size).all())  # uniform chunks: the official contiguous chunk_size layout
    return tuple(t[:, :, perm] for t in (q, k, v)), ids, size


def _ours_selection(q, k, ids, budget_scope: str, threshold_type: str, sel_kw: dict) -> torch.Tensor:
    n_chunks = int(ids.max()) + 1
    if sel_kw["mode"] == "topk" and min(sel_kw["topk"], n_chunks) == 1:
        return torch.ones(*q.shape[:3], n_chunks, dtype=torch.bool)  # the dense fallback, decided statically
    sel = select_chunks(chunk_gates(q, k, chunk_starts(ids)), ids, threshold_type=threshold_type,
                        budget_scope=budget_scope, **sel_kw)
    return apply_dense_fallback(sel, ids, budget_scope)


def _oracle_selection(q, k, size: int, threshold_type: str, sel_kw: dict) -> torch.Tensor:
    """The official routing as ``[B, H, S, n_chunks]`` per sample (own chunk in, dense fallback applied)."""
    batch, heads, seq, _ = q.shape
    routed, own, _ = official_vmoba_selection(q, k, chunk_size=size, threshold_type=threshold_type,
                                              topk=sel_kw.get("topk", 3), mode=sel_kw["mode"],
                                              threshold=sel_kw.get("threshold", 0.25))
    per = seq // size
    chosen = (routed | own[:, None, :]).view(batch, per, heads, batch, seq)  # [b_chunk, c, H, b_tok, s]
    out = torch.stack([chosen[b, :, :, b] for b in range(batch)]).permute(0, 2, 3, 1)  # [B, H, S, C]
    if not bool(routed.any()):  # the official fallback: the whole packed call is dense
        out = torch.ones_like(out)
    return out


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("threshold_type", ["query_head", "head_global"])
@pytest.mark.parametrize("sel", list(SELECTIONS))
@pytest.mark.parametrize("partition", list(PARTITIONS))
def test_vmoba_official_scope_matches_the_oracle(partition: str, sel: str, threshold_type: str, batch: int) -> None:
    (q, k, v), ids, size = vmoba_case(partition, batch)
    kw = {**SELECTIONS[sel], "threshold_type": threshold_type}
    want = official_vmoba(q, k, v, chunk_size=size, **kw)
    got = vmoba_attention(q, k, v, chunk_ids=ids, budget_scope="batch", **kw)
    assert rel_err(got, want) < REL_TOL
    assert rel_err(vmoba_reference(q, k, v, chunk_ids=ids, budget_scope="batch", **kw), want) < REL_TOL  # loop twin
    ours = _ours_selection(q, k, ids, "batch", threshold_type, SELECTIONS[sel])
    assert torch.equal(ours, _oracle_selection(q, k, size, threshold_type, SELECTIONS[sel]))
    if threshold_type == "query_head":  # per-row rules: the default scope is the official one as well
        assert rel_err(vmoba_attention(q, k, v, chunk_ids=ids, **kw), want) < REL_TOL


def test_vmoba_fixed_deviations_show_on_these_grids() -> None:
    """Deviations 2 and 3 of issue 22 were visible here: tau small enough that the own chunk reaches it,
    and top-k 1. The official rule keeps the best other chunk / falls back to dense."""
    (q, k, v), ids, size = vmoba_case("3d_cube", 1)
    own_only = F.scaled_dot_product_attention(q, k, v, attn_mask=ids[:, None] == ids[None, :])
    for kw in ({"mode": "threshold", "threshold": 0.1}, {"mode": "topk", "topk": 1}):
        want = official_vmoba(q, k, v, chunk_size=size, **kw)
        assert rel_err(own_only, want) > 0.05  # the old behaviour (own chunk only) is far off
        assert rel_err(vmoba_attention(q, k, v, chunk_ids=ids, **kw), want) < REL_TOL
    dense = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(dense, official_vmoba(q, k, v, chunk_size=size, mode="topk", topk=1)) < REL_TOL


@pytest.mark.parametrize("sel", ["tau0.25", "tau0.6", "top2", "top3"])
def test_vmoba_head_global_sample_scope_is_each_sample_alone(sel: str) -> None:
    """Default ``budget_scope="sample"``: a batch gives each sample's official single-sample output;
    the official packed batch (``"batch"``) budgets jointly and differs."""
    (q, k, v), ids, size = vmoba_case("3d_cube", 2)
    kw = {**SELECTIONS[sel], "threshold_type": "head_global"}
    got = vmoba_attention(q, k, v, chunk_ids=ids, **kw)
    alone = torch.cat([official_vmoba(q[b:b + 1], k[b:b + 1], v[b:b + 1], chunk_size=size, **kw) for b in range(2)])
    assert rel_err(got, alone) < REL_TOL
    assert rel_err(got, official_vmoba(q, k, v, chunk_size=size, **kw)) > 1e-3


def test_vmoba_oracle_is_not_trivially_dense_or_local() -> None:
    """Sanity of the grids: the threshold rule routes a varying number of chunks per query."""
    (q, k, _), _, size = vmoba_case("3d_cube", 2)
    sel = _oracle_selection(q, k, size, "query_head", SELECTIONS["tau0.25"])
    counts = sel.sum(-1)
    assert counts.min() >= 2 and counts.max() < 32 and counts.float().std() > 0


# ----------------------------------------------------------------------------- Triton router (interpreter)

ROUTER_CASES = [(p, s) for p in PARTITIONS for s in ("tau0", "tau0.1", "tau0.25", "tau0.6", "top2", "top3")]
FUSED_CASES = [("3d_cube", "tau0.25"), ("3d_cube", "top3"), ("2d_tile", "tau0")]


def _worker(out_path: str) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {}
    for partition, sel in ROUTER_CASES:
        (q, k, _), ids, _ = vmoba_case(partition, 2)
        from mmeff.video.vmoba_core import chunk_mean_keys

        means = chunk_mean_keys(k.to(dev), chunk_starts(ids).to(dev))
        kw = {key: SELECTIONS[sel][key] for key in ("mode", "topk", "threshold") if key in SELECTIONS[sel]}
        res[(partition, sel)] = routing.route_chunks_triton(q.to(dev), means, ids.to(dev), **kw).cpu()
    for partition, sel in FUSED_CASES:
        (q, k, v), ids, _ = vmoba_case(partition, 2)
        res[("fused", partition, sel)] = vmoba_attention(q.to(dev), k.to(dev), v.to(dev), chunk_ids=ids.to(dev),
                                                         **SELECTIONS[sel]).cpu()
    res["forced"] = routing.triton_routes(torch.zeros(1, 1, 1, 16, device=dev), 8)
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def triton_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not routing.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_worker(__file__, tmp_path_factory.mktemp("official") / "outputs.pt")


@pytest.mark.parametrize("case", ROUTER_CASES, ids=[f"{p}-{s}" for p, s in ROUTER_CASES])
def test_triton_router_matches_the_official_routing(triton_outputs: dict, case: tuple[str, str]) -> None:
    partition, sel = case
    (q, k, _), ids, size = vmoba_case(partition, 2)
    routes = triton_outputs[case]
    if SELECTIONS[sel]["mode"] == "topk":
        routes = torch.zeros(*routes.shape[:3], int(ids.max()) + 1, dtype=torch.bool).scatter_(-1, routes.long(), True)
    else:
        routes = apply_dense_fallback(routes, ids, "batch")
    assert torch.equal(routes, _oracle_selection(q, k, size, "query_head", SELECTIONS[sel]))


@pytest.mark.parametrize("case", FUSED_CASES, ids=[f"{p}-{s}" for p, s in FUSED_CASES])
def test_fused_triton_vmoba_matches_the_official_output(triton_outputs: dict, case: tuple[str, str]) -> None:
    assert triton_outputs["forced"]  # the worker really ran the Triton path
    partition, sel = case
    (q, k, v), _, size = vmoba_case(partition, 2)
    want = official_vmoba(q, k, v, chunk_size=size, **SELECTIONS[sel])
    assert rel_err(triton_outputs[("fused", *case)], want) < REL_TOL


# ============================================================================= Rectified SpaAttn


def rectified_case(grid: tuple[int, int, int], block: int, n_text: int, batch: int = 2, seed: int = 2):
    """Visual tokens in gilbert order, then ``n_text`` text tokens (text last, as the official code)."""
    q, k, v = local_qkv(grid, batch=batch, seed=seed)
    order = gilbert_order(*grid)
    q, k, v = (t[:, :, order] for t in (q, k, v))
    if n_text:
        gen = torch.Generator().manual_seed(seed + 100)
        extra = [torch.randn(batch, q.shape[1], n_text, q.shape[3], generator=gen) for _ in range(3)]
        q, k, v = (torch.cat([t, e], dim=2) for t, e in zip((q, k, v), extra))
    neighbours = block_neighbours(order, *grid, block)
    return (q, k, v), neighbours


TEXT_LAYOUTS = {"wan_no_text": (0, None), "text_full": (16, [16, 16]), "text_padded": (16, [12, 5])}


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("text", list(TEXT_LAYOUTS))
@pytest.mark.parametrize("with_neighbours", [True, False])
def test_rectified_joint_floor_matches_the_oracle(text: str, drop: float, tau: float, with_neighbours: bool) -> None:
    n_text, valid = TEXT_LAYOUTS[text]
    block = 16
    (q, k, v), neigh = rectified_case(GRID, block, n_text)
    n_visual = q.shape[2] - n_text
    ff = 4 if n_text == 0 else 0  # Wan keeps the first frame's blocks dense among themselves
    neigh = neigh if with_neighbours else None
    want, want_mask = official_rectified(q, k, v, n_visual=n_visual, block=block, drop=drop, tau=tau,
                                         text_valid=valid, neighbours=neigh, first_frame_blocks=ff)
    got, st = rectified_sparse_attention(
        q, k, v, n_visual=n_visual, text_len=n_text, text_valid_len=None if valid is None else torch.tensor(valid),
        block=block, drop=drop, tau=tau, neighbours=neigh, first_frame_blocks=ff, floor="joint", return_stats=True)
    assert torch.equal(st.block_mask, want_mask)
    assert rel_err(got, want) < REL_TOL
    if n_text == 0:  # Wan path: the default floor is the official one (no text column; exact rounding here)
        default = rectified_sparse_attention(q, k, v, n_visual=n_visual, text_len=0, block=block, drop=drop, tau=tau,
                                             neighbours=neigh, first_frame_blocks=ff)
        assert rel_err(default, want) < REL_TOL


def test_rectified_text_first_matches_the_official_text_last() -> None:
    """The official MM-DiT processors flip text to the end; ours takes text first as it comes (CogVideoX)."""
    block, (n_text, valid) = 16, TEXT_LAYOUTS["text_padded"]
    (q, k, v), neigh = rectified_case(GRID, block, n_text, seed=5)
    n_visual = q.shape[2] - n_text
    want, want_mask = official_rectified(q, k, v, n_visual=n_visual, block=block, drop=0.8, tau=0.3,
                                         text_valid=valid, neighbours=neigh)
    first = torch.cat([torch.arange(n_visual, n_visual + n_text), torch.arange(n_visual)])  # text, then visual
    got, st = rectified_sparse_attention(
        *(t[:, :, first] for t in (q, k, v)), n_visual=n_visual, text_len=n_text, text_valid_len=torch.tensor(valid),
        block=block, drop=0.8, tau=0.3, neighbours=neigh, text_position="first", floor="joint", return_stats=True)
    assert torch.equal(st.block_mask, want_mask)
    back = torch.empty_like(got)
    back[:, :, first] = got
    assert rel_err(back, want) < REL_TOL


def test_rectified_default_floor_differs_only_with_text_as_documented() -> None:
    """Deviation 1 of issue 22: with text, the official floor counts the text column, so drop=0 is not
    dense there; the default ``floor="visual"`` keeps drop=0 == dense."""
    block, (n_text, valid) = 16, TEXT_LAYOUTS["text_full"]
    (q, k, v), _ = rectified_case(GRID, block, n_text)
    n_visual = q.shape[2] - n_text
    _, official_mask = official_rectified(q, k, v, n_visual=n_visual, block=block, drop=0.0, tau=0.3, text_valid=valid)
    assert not bool(official_mask.all())  # official drop=0 with text drops a visual block in some rows
    _, st = rectified_sparse_attention(q, k, v, n_visual=n_visual, text_len=n_text, block=block, drop=0.0, tau=0.3,
                                       return_stats=True)
    assert bool(st.block_mask.all())


def test_rectified_official_rounding() -> None:
    """``int((1 - 0.8) * n)`` truncates 0.19999999999999996 * n: 179 of 900 HunyuanVideo blocks, 0 of 5."""
    assert top_k_blocks(0.8, 900) == 180 and top_k_blocks(0.8, 900, "joint") == 179
    assert top_k_blocks(0.8, 5) == 1 and top_k_blocks(0.8, 5, "joint") == 0
    grid, block = (5, 4, 8), 32  # 5 visual blocks, no text (the Wan path)
    (q, k, v), _ = rectified_case(grid, block, 0, seed=4)
    want, want_mask = official_rectified(q, k, v, n_visual=q.shape[2], block=block, drop=0.8, tau=0.0)
    got, st = rectified_sparse_attention(q, k, v, n_visual=q.shape[2], text_len=0, block=block, drop=0.8, tau=0.0,
                                         floor="joint", return_stats=True)
    assert torch.equal(st.block_mask, want_mask) and rel_err(got, want) < REL_TOL
    assert int(want_mask.sum(-1).min()) == 1  # tau 0 keeps one block; the official floor adds none
    _, default = rectified_sparse_attention(q, k, v, n_visual=q.shape[2], text_len=0, block=block, drop=0.8, tau=0.0,
                                            return_stats=True)
    assert torch.equal(default.block_mask, want_mask)  # floor 1 == the one block tau keeps: same here


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
