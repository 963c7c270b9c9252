"""Tests for the fused chunk router (mmeff.kernels.chunk_routing) and the key-major attention kernel.

Triton outputs come from ONE worker subprocess (``TRITON_INTERPRET=1`` on CPU, the real
kernels on a GPU), as in test_chunk_routed_attn; the parent compares them with the torch twins.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

try:
    from .triton_worker import run_worker
except ImportError:  # executed as the worker script
    run_worker = None

import mmeff.kernels.chunk_routing as routing
from mmeff.kernels.chunk_routed_attn import chunk_routed_attention_naive
from mmeff.kernels.chunk_routed_attn.key_major import chunk_routed_attention_key_major
from mmeff.kernels.chunk_routed_attn.key_major_layout import key_major_layout
from mmeff.kernels.chunk_routing import route_chunks, route_chunks_naive

# ----------------------------------------------------------------------------- cases

ROUTE_CASES: dict[str, dict] = {
    "top3_c7": {"seed": 1, "S": 40, "D": 16, "C": 7, "mode": "topk", "topk": 3},
    "top1_c7": {"seed": 2, "S": 21, "D": 16, "C": 7, "mode": "topk", "topk": 1},
    "top_all_c33_d64": {"seed": 3, "S": 30, "D": 64, "C": 33, "mode": "topk", "topk": 40},
    "top15_c300_bf16": {"seed": 4, "S": 20, "D": 32, "C": 300, "mode": "topk", "topk": 15, "dtype": torch.bfloat16},
    "tau0.1_c7": {"seed": 5, "S": 40, "D": 16, "C": 7, "mode": "threshold", "threshold": 0.1},
    "tau0.25_c33": {"seed": 6, "S": 35, "D": 32, "C": 33, "mode": "threshold", "threshold": 0.25},
    "tau0.6_c33_flat": {"seed": 7, "S": 35, "D": 16, "C": 33, "mode": "threshold", "threshold": 0.6, "flat_head": True},
    "tau0.25_c300": {"seed": 8, "S": 20, "D": 16, "C": 300, "mode": "threshold", "threshold": 0.25},
    "tau0_c7": {"seed": 9, "S": 20, "D": 16, "C": 7, "mode": "threshold", "threshold": 0.0},
    "tau2_c7": {"seed": 10, "S": 20, "D": 16, "C": 7, "mode": "threshold", "threshold": 2.0},
    # two chunks: whenever the own gate is the larger, the other chunk ties with the own one at 0
    "tau0.25_c2_ties": {"seed": 16, "S": 24, "D": 16, "C": 2, "mode": "threshold", "threshold": 0.25},
}


def make_route_case(name: str) -> tuple[tuple, dict]:
    spec = ROUTE_CASES[name]
    gen = torch.Generator().manual_seed(spec["seed"])
    b, h, s, d, c = 2, 2, spec["S"], spec["D"], spec["C"]
    q = torch.randn(b, h, s, d, generator=gen).to(spec.get("dtype", torch.float32))
    means = torch.randn(b, h, c, d, generator=gen)
    if spec.get("flat_head"):
        means[1, 0] = 0.0  # every gate of this head is 0: a degenerate (all-tied) row
    query_chunk = torch.arange(s) * c // s
    kwargs = {"mode": spec["mode"], "topk": spec.get("topk", 3), "threshold": spec.get("threshold", 0.25)}
    return (q, means, query_chunk), kwargs


_BOUNDS = [0, 5, 23, 24, 40, 40, 47, 50]  # chunks of 5, 18, 1, 16, 0 (empty), 7, 3 keys
KM_CASES: dict[str, dict] = {
    "fp32_k4": {"seed": 11, "dtype": torch.float32, "K": 4, "bm": 16, "bn": 16},
    "bf16_k4": {"seed": 12, "dtype": torch.bfloat16, "K": 4, "bm": 16, "bn": 16},
    "fp16_k2_bm32": {"seed": 13, "dtype": torch.float16, "K": 2, "bm": 32, "bn": 16},
    "fp32_k1_d32_strided": {"seed": 14, "dtype": torch.float32, "K": 1, "bm": 16, "bn": 32, "D": 32, "strided": True},
    "fp32_all_empty": {"seed": 15, "dtype": torch.float32, "K": 3, "bm": 16, "bn": 16, "empty": True},
}


def make_km_case(name: str) -> tuple[tuple, dict]:
    spec = KM_CASES[name]
    gen = torch.Generator().manual_seed(spec["seed"])
    b, h, s, d, n_chunks = 2, 2, 50, spec.get("D", 16), len(_BOUNDS) - 1
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(spec["dtype"]) for _ in range(3))
    if spec.get("strided"):
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    idx = torch.rand(b, h, s, n_chunks, generator=gen).argsort(-1)[..., : spec["K"]].to(torch.int32)
    idx[..., -1] = torch.where(torch.rand(b, h, s, generator=gen) < 0.3, -1, idx[..., -1])  # empty slots
    idx[0, 0, 0] = -1  # a row with no key
    idx[1, 1, 3, 0] = 4  # the empty chunk
    if spec.get("empty"):
        idx[:] = -1
    return (q, k, v, torch.tensor(_BOUNDS, dtype=torch.int32), idx), {"block_m": spec["bm"], "block_n": spec["bn"]}


def _vmoba_cases() -> dict[str, tuple[tuple, dict]]:
    from mmeff.video.vmoba_partition import partition_order

    gen = torch.Generator().manual_seed(21)
    _, ids, _ = partition_order(4, 4, 6, (2, 2, 3))
    q, k, v = (torch.randn(1, 2, ids.numel(), 16, generator=gen) for _ in range(3))
    return {
        "top3": ((q, k, v), {"chunk_ids": ids, "mode": "topk", "topk": 3}),
        "top3_query_major": ((q, k, v), {"chunk_ids": ids, "mode": "topk", "topk": 3, "layout": "query_major"}),
        "tau0.4": ((q, k, v), {"chunk_ids": ids, "mode": "threshold", "threshold": 0.4}),
    }


# ----------------------------------------------------------------------------- Triton worker


def _worker(out_path: str) -> None:
    from mmeff.video.vmoba_core import vmoba_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"meta": {"routes_with_triton": routing.triton_routes(torch.zeros(1, 1, 1, 16, device=dev), 7)}}
    for name in ROUTE_CASES:
        args, kw = make_route_case(name)
        res[f"route/{name}"] = routing.route_chunks_triton(*(a.to(dev) for a in args), **kw).cpu()
    for name in KM_CASES:
        args, kw = make_km_case(name)
        out, lse = chunk_routed_attention_key_major(*(a.to(dev) for a in args), **kw)
        res[f"km/{name}"] = (out.cpu(), lse.cpu())
    for name, ((q, k, v), kw) in _vmoba_cases().items():
        kw = {**kw, "chunk_ids": kw["chunk_ids"].to(dev)}
        out, stats = vmoba_attention(q.to(dev), k.to(dev), v.to(dev), return_stats=True, **kw)
        res[f"vmoba/{name}"] = (out.cpu(), stats)
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def triton_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not routing.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_worker(__file__, tmp_path_factory.mktemp("routing") / "outputs.pt")


@pytest.mark.parametrize("name", list(ROUTE_CASES))
def test_triton_router_matches_torch(triton_outputs: dict, name: str) -> None:
    args, kw = make_route_case(name)
    expect = route_chunks_naive(*args, **kw)
    got = triton_outputs[f"route/{name}"]
    assert got.dtype == expect.dtype and got.shape == expect.shape
    assert torch.equal(got, expect)


def test_router_dispatch(triton_outputs: dict) -> None:
    assert triton_outputs["meta"]["routes_with_triton"] is True


@pytest.mark.parametrize("name", list(KM_CASES))
def test_key_major_matches_naive(triton_outputs: dict, name: str) -> None:
    args, kw = make_km_case(name)
    ref_out, ref_lse = chunk_routed_attention_naive(*args)
    out, lse = triton_outputs[f"km/{name}"]
    assert out.dtype == args[0].dtype and out.shape == ref_out.shape
    tol = {"atol": 1e-5, "rtol": 1e-5} if args[0].dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    if name == "fp32_k4":
        assert torch.all(out[0, 0, 0] == 0) and torch.isneginf(lse[0, 0, 0])


@pytest.mark.parametrize("name", ["top3", "top3_query_major", "tau0.4"])
def test_fused_vmoba_matches_reference(triton_outputs: dict, name: str) -> None:
    from mmeff.video.vmoba_core import vmoba_attention, vmoba_reference

    (q, k, v), kw = _vmoba_cases()[name]
    kw.pop("layout", None)
    expect, ref_stats = vmoba_reference(q, k, v, return_stats=True, **kw)
    out, stats = triton_outputs[f"vmoba/{name}"]
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    ref_stats.pop("selected")
    assert stats == pytest.approx(ref_stats)
    # the CPU path (torch routing) agrees too
    torch.testing.assert_close(vmoba_attention(q, k, v, **kw), expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- torch side


def test_naive_routes_match_the_loop_reference() -> None:
    from mmeff.video.vmoba_core import _reference_selection

    for name in ("top3_c7", "tau0.25_c33", "tau0.6_c33_flat"):
        (q, means, qc), kw = make_route_case(name)
        routes = route_chunks_naive(q, means, qc, **kw)
        gates = routing.gates_from_means(q, means)
        bounds = [0] + [int((qc <= c).sum()) for c in range(means.shape[2])]
        chosen = _reference_selection(gates.double().tolist(), bounds, kw["mode"], kw["threshold"], kw["topk"], "query_head")
        for b in range(2):
            for h in range(2):
                for s in range(q.shape[2]):
                    row = routes[b, h, s]
                    got = set(row.tolist()) if kw["mode"] == "topk" else set(row.nonzero().flatten().tolist())
                    assert got == chosen[b][h][s], (name, b, h, s)


def test_topk_rows_order_and_ties() -> None:
    gates = torch.tensor([[[[0.5, 2.0, 2.0, -1.0, 3.0]]]])
    qc = torch.tensor([3])
    means = torch.eye(5).view(1, 1, 5, 5)
    idx = route_chunks_naive(gates[0, 0].view(1, 1, 1, 5), means, qc, mode="topk", topk=4)
    assert idx.tolist() == [[[[3, 4, 1, 2]]]]  # own chunk, then descending, ties by index
    flat = route_chunks_naive(torch.zeros(1, 1, 1, 5), means, qc, mode="threshold", threshold=0.5)
    # all gates equal (official): the range is <= 1e-6 so it divides by 1, every share is 0 and never
    # reaches remain = 0.5, so every chunk is taken
    assert flat[0, 0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_threshold_rows_keep_the_best_other_chunk_and_rank_ties_by_index() -> None:
    """Official rule: the first-ranked competitor is always kept; the own chunk competes at 0."""
    means = torch.eye(3).view(1, 1, 3, 3)
    def row(gates: list[float], own: int, tau: float) -> list[int]:
        q = torch.tensor(gates).view(1, 1, 1, 3)
        sel = route_chunks_naive(q, means, torch.tensor([own]), mode="threshold", threshold=tau)
        return sel[0, 0, 0].nonzero().flatten().tolist()
    assert row([0.0, 1.0, 0.5], 1, 0.25) == [1, 2]  # own share 1/1.5 >= tau: still the best other chunk
    assert row([0.0, 1.0, 0.0], 1, 0.25) == [0, 1]  # others tie at 0 with the own one: lowest index, chunk 0
    assert row([1.0, 0.0, 0.0], 0, 0.25) == [0]  # ... which is the own chunk here: nothing routed
    assert row([0.0, 1.0, 0.5], 0, 0.9) == [0, 1, 2]  # 0.9 is never reached: everything


def test_key_major_layout_covers_every_pair_once() -> None:
    (_, _, _, _, idx), kw = make_km_case("fp32_k4")
    n_chunks, bm = len(_BOUNDS) - 1, 16
    lay = key_major_layout(idx, n_chunks, bm)
    bsz, heads, seq, slots = idx.shape
    # every (b, h, s, slot) landed on a pair that names its query and sits in its chunk's group
    g_of_pair = torch.searchsorted(lay.group_start.long()[1:], torch.arange(lay.n_pairs), right=True)
    assert sorted(lay.pair_of_slot.flatten().tolist()) == list(range(lay.n_pairs))
    for b in range(bsz):
        for h in range(heads):
            for s in range(seq):
                for j in range(slots):
                    p = int(lay.pair_of_slot[b, h, s, j])
                    c = int(idx[b, h, s, j]) if idx[b, h, s, j] >= 0 else n_chunks
                    assert int(lay.pair_query[p]) == s
                    assert int(g_of_pair[p]) == (b * heads + h) * (n_chunks + 1) + c
    # live tiles cover exactly the pairs of real chunks, block_m at a time, queries ascending
    live = lay.tile_group < lay.n_groups
    covered = []
    for t in live.nonzero().flatten().tolist():
        g, first = int(lay.tile_group[t]), int(lay.tile_first[t])
        end = min(first + bm, int(lay.group_start[g + 1]))
        assert g % (n_chunks + 1) != n_chunks and first < end
        covered.extend(range(first, end))
        assert lay.pair_query[first:end].tolist() == sorted(lay.pair_query[first:end].tolist())
    real = (g_of_pair % (n_chunks + 1) != n_chunks).nonzero().flatten().tolist()
    assert len(real) == int((idx >= 0).sum()) and sorted(covered) == real


def test_route_chunks_errors() -> None:
    (q, means, qc), _ = make_route_case("top3_c7")
    with pytest.raises(ValueError, match="mode must be one of"):
        route_chunks(q, means, qc, mode="dense")
    with pytest.raises(ValueError, match="topk must be an int"):
        route_chunks(q, means, qc, mode="topk", topk=0)
    with pytest.raises(ValueError, match="threshold must be a finite"):
        route_chunks(q, means, qc, mode="threshold", threshold=float("nan"))
    with pytest.raises(ValueError, match="chunk_means must be"):
        route_chunks(q, means[:, :1], qc, mode="topk")
    with pytest.raises(ValueError, match="query_chunk must be"):
        route_chunks(q, means, qc[:5], mode="topk")
    if routing.HAS_TRITON:
        big = torch.zeros(1, 1, routing.MAX_CHUNKS + 1, 16)
        with pytest.raises(ValueError, match="at most"):
            routing.route_chunks_triton(q[:1, :1], big, qc, mode="topk")


def test_key_major_errors() -> None:
    if not routing.HAS_TRITON:
        pytest.skip("triton is not installed")
    (q, k, v, cs, idx), _ = make_km_case("fp32_k4")
    mask = F.one_hot(idx.clamp_min(0).long(), 7).any(-2)
    with pytest.raises(ValueError, match="integer index list"):
        chunk_routed_attention_key_major(q, k, v, cs, mask)
    with pytest.raises(ValueError, match=r"\[0, n_chunks=7\)"):
        chunk_routed_attention_key_major(q, k, v, cs, idx + 7)
    with pytest.raises(ValueError, match="one row per query"):
        chunk_routed_attention_key_major(q, k, v, cs, idx[:, :, :10])
    with pytest.raises(ValueError, match="head dims"):
        chunk_routed_attention_key_major(q[..., :8], k[..., :8], v[..., :8], cs, idx)


def test_vmoba_layout_errors() -> None:
    from mmeff.video.vmoba_core import vmoba_attention

    (q, k, v), kw = _vmoba_cases()["tau0.4"]
    with pytest.raises(ValueError, match="layout must be one of"):
        vmoba_attention(q, k, v, layout="diagonal", **kw)
    with pytest.raises(ValueError, match="needs mode='topk'"):
        vmoba_attention(q, k, v, layout="key_major", **kw)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
