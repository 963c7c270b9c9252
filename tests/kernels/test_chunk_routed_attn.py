"""Tests for mmeff.kernels.chunk_routed_attn (naive reference, Triton kernel, layouts).

As in test_block_sparse_attn, Triton comparisons run in ONE subprocess started by a
module-scoped fixture: this file is re-executed as a script (``--worker``) with
``TRITON_INTERPRET=1`` (CPU) and ``MMEFF_FORCE_TRITON=1`` set in the child only, because
Triton picks interpreter vs GPU when the kernel module is imported. The worker saves the
Triton outputs; the tests rebuild the same seeded inputs here and compare against the naive
reference. With a CUDA device the worker runs the real kernel.
"""

from __future__ import annotations

import math
import sys

import pytest

try:
    from .triton_worker import run_worker
except ImportError:  # executed as the worker script
    run_worker = None
import torch
import torch.nn.functional as F

import mmeff.kernels.chunk_routed_attn as cra
from mmeff.kernels.chunk_routed_attn import (
    chunk_mask_from_indices,
    chunk_routed_attention_naive,
    chunk_routed_attention_triton,
    key_chunk_index,
    tile_union,
)



# ----------------------------------------------------------------------------- input builders


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def make_case(name: str) -> tuple[tuple, dict]:
    """Seeded inputs ``(args, kwargs)`` for a Triton-vs-naive case (CPU tensors)."""
    spec = dict(CASES[name])
    gen = torch.Generator().manual_seed(spec["seed"])
    b, h, sq, d, dtype = spec["B"], spec["H"], spec["Sq"], spec["D"], spec["dtype"]
    bounds = spec["bounds"]
    skv, n_chunks = bounds[-1], len(bounds) - 1
    q = _rand(gen, b, h, sq, d, dtype=dtype)
    k = _rand(gen, b, h, skv, d, dtype=dtype)
    v = _rand(gen, b, h, skv, d, dtype=dtype)
    if spec.get("strided"):  # q/k/v as [B, H, S, D] views of [B, S, H, D] tensors
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    sel = torch.rand(b, h, sq, n_chunks, generator=gen) < spec.get("density", 0.4)
    if spec.get("density", 0.4) <= 1.0:
        sel[0, 0, 0] = False  # one row with no key at all
    sel[-1, -1, -1] = True  # one row with every chunk
    if spec.get("empty"):
        sel[:] = False
    if spec.get("as_indices"):  # int32 index list padded with -1, in shuffled order
        keyed = torch.where(sel, torch.rand(sel.shape, generator=gen), torch.full(sel.shape, 2.0))
        order = keyed.argsort(-1)
        cnt = sel.sum(-1, keepdim=True)
        pos = torch.arange(n_chunks)
        sel = torch.where(pos < cnt, order, -1).to(torch.int32)[..., : int(cnt.max()) + 1]
    kwargs: dict = {"block_m": spec["bm"], "block_n": spec["bn"]}
    if spec.get("scale") is not None:
        kwargs["scale"] = spec["scale"]
    return (q, k, v, torch.tensor(bounds, dtype=torch.int32), sel), kwargs


_RAGGED = [0, 8, 16, 24, 32, 40, 48, 50]  # last chunk holds 2 tokens
_IRREGULAR = [0, 5, 23, 24, 40, 40, 57, 60]  # chunks of 5, 18, 1, 16, 0 (empty), 17, 3 keys
_BASE = {"B": 1, "H": 2, "Sq": 40, "D": 16, "bm": 16, "bn": 16, "dtype": torch.float32, "bounds": _RAGGED}
CASES: dict[str, dict] = {
    "fp32_ragged": {**_BASE, "seed": 1, "B": 2, "Sq": 50},
    "bf16_ragged": {**_BASE, "seed": 2, "dtype": torch.bfloat16},
    "fp16_ragged": {**_BASE, "seed": 3, "dtype": torch.float16},
    "fp32_irregular_d32": {**_BASE, "seed": 4, "B": 2, "H": 1, "Sq": 37, "D": 32, "bm": 32, "bounds": _IRREGULAR, "scale": 0.3},
    "bf16_irregular": {**_BASE, "seed": 5, "dtype": torch.bfloat16, "Sq": 45, "bounds": _IRREGULAR, "density": 0.3},
    "fp32_indices_strided": {**_BASE, "seed": 6, "as_indices": True, "strided": True},
    "fp32_all_empty": {**_BASE, "seed": 7, "empty": True},
    "fp32_dense": {**_BASE, "seed": 8, "density": 1.1, "bn": 32},
}


def _tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 3e-2, "rtol": 3e-2}


def _vmoba_case() -> tuple[tuple, dict]:
    """VMoBA end to end (both branches + LSE merge) on a 3-D partition with ragged sizes."""
    from mmeff.video.vmoba_partition import partition_order

    gen = torch.Generator().manual_seed(11)
    _, ids, _ = partition_order(4, 4, 6, (2, 2, 3))
    q, k, v = (_rand(gen, 1, 1, ids.numel(), 16) for _ in range(3))
    return (q, k, v), {"chunk_ids": ids, "mode": "threshold", "threshold": 0.5}


# ----------------------------------------------------------------------------- Triton worker


def _worker(out_path: str) -> None:
    """Run every case through the Triton path and save the outputs (subprocess entry point)."""
    from mmeff.video.vmoba_core import vmoba_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"meta": {"interpreted": cra.triton_kernel._is_interpreted(), "device": dev}}
    for name in CASES:
        args, kwargs = make_case(name)
        args = tuple(a.to(dev) for a in args)
        if name == "fp32_ragged":  # also through the public dispatcher (default tiles)
            results["meta"]["dispatch_uses_triton"] = cra.use_triton(args[0])
            results["dispatch"] = tuple(t.cpu() for t in cra.chunk_routed_attention(*args))
        out, lse = chunk_routed_attention_triton(*args, **kwargs)
        results[name] = (out.cpu(), lse.cpu())
    (q, k, v), kw = _vmoba_case()
    kw["chunk_ids"] = kw["chunk_ids"].to(dev)
    results["vmoba"] = vmoba_attention(q.to(dev), k.to(dev), v.to(dev), **kw).cpu()
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not cra.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_worker(__file__, tmp_path_factory.mktemp("cra") / "triton_outputs.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_naive(triton_outputs: dict, name: str) -> None:
    args, kwargs = make_case(name)
    kwargs = {k: v for k, v in kwargs.items() if k == "scale"}
    ref_out, ref_lse = chunk_routed_attention_naive(*args, **kwargs)
    out, lse = triton_outputs[name]
    assert out.dtype == args[0].dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), **_tolerances(args[0].dtype))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4 if args[0].dtype == torch.float32 else 2e-3, rtol=1e-4)


def test_triton_dispatch_and_meta(triton_outputs: dict) -> None:
    meta = triton_outputs["meta"]
    assert meta["dispatch_uses_triton"] is True
    assert meta["interpreted"] == (meta["device"] == "cpu")
    args, _ = make_case("fp32_ragged")
    ref_out, ref_lse = chunk_routed_attention_naive(*args)
    out, lse = triton_outputs["dispatch"]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_triton_empty_rows(triton_outputs: dict) -> None:
    out, lse = triton_outputs["fp32_all_empty"]
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out, lse = triton_outputs["fp32_ragged"]
    assert torch.all(out[0, 0, 0] == 0) and torch.isneginf(lse[0, 0, 0])


def test_triton_dense_equals_sdpa(triton_outputs: dict) -> None:
    (q, k, v, _, _), _ = make_case("fp32_dense")
    out, _ = triton_outputs["fp32_dense"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_triton_vmoba_end_to_end(triton_outputs: dict) -> None:
    from mmeff.video.vmoba_core import vmoba_attention, vmoba_reference

    (q, k, v), kw = _vmoba_case()
    expect = vmoba_reference(q, k, v, **kw)
    torch.testing.assert_close(triton_outputs["vmoba"], expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vmoba_attention(q, k, v, **kw), expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- naive reference


def _loop_attention(q, k, v, bounds, sel_mask, scale):
    """Row-by-row softmax over the keys of the selected chunks (explicit loops)."""
    b_, h_, sq, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b_, h_, sq), float("-inf"))
    for b in range(b_):
        for h in range(h_):
            for s in range(sq):
                cols = [t for c in range(len(bounds) - 1) if sel_mask[b, h, s, c] for t in range(bounds[c], bounds[c + 1])]
                if cols:
                    row = (k[b, h, cols] @ q[b, h, s]) * scale
                    out[b, h, s] = torch.softmax(row, -1) @ v[b, h, cols]
                    lse[b, h, s] = torch.logsumexp(row, -1)
    return out, lse


def test_naive_matches_loops() -> None:
    (q, k, v, cs, sel), _ = make_case("fp32_irregular_d32")
    out, lse = chunk_routed_attention_naive(q, k, v, cs, sel, scale=0.3)
    ref_out, ref_lse = _loop_attention(q, k, v, cs.tolist(), sel, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_naive_all_selected_equals_sdpa() -> None:
    (q, k, v, cs, _), _ = make_case("fp32_ragged")
    sel = torch.ones(2, 2, 50, 7, dtype=torch.bool)  # fp32_ragged is B=2, H=2, Sq=50
    out, lse = chunk_routed_attention_naive(q, k, v, cs, sel)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)


def test_index_list_equals_mask() -> None:
    (q, k, v, cs, idx), _ = make_case("fp32_indices_strided")
    mask = chunk_mask_from_indices(idx, 7)
    assert mask.shape == (1, 2, 40, 7) and mask.dtype == torch.bool
    a = chunk_routed_attention_naive(q, k, v, cs, idx)
    b = chunk_routed_attention_naive(q, k, v, cs, mask)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(chunk_mask_from_indices(torch.tensor([[[[2, -1, 0]]]]), 3), torch.tensor([[[[True, False, True]]]]))


def test_key_chunk_index_and_tile_union() -> None:
    cs = torch.tensor(_IRREGULAR)
    kc = key_chunk_index(cs, 60)
    assert kc.tolist() == [c for c in range(7) for _ in range(_IRREGULAR[c], _IRREGULAR[c + 1])]
    sel = torch.zeros(1, 1, 5, 4, dtype=torch.bool)
    sel[0, 0, 0, 3] = sel[0, 0, 1, 1] = sel[0, 0, 4, 2] = True
    idx, cnt = tile_union(sel, 2)  # tiles {0,1}, {2,3}, {4}
    assert cnt.tolist() == [[[2, 0, 1]]]
    assert idx[0, 0, 0].tolist() == [1, 3] and idx[0, 0, 2, 0] == 2 and idx[0, 0, 1].tolist() == [-1, -1]


def test_dispatcher_uses_naive_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMEFF_FORCE_TRITON", raising=False)
    (q, k, v, cs, sel), _ = make_case("fp32_ragged")
    assert not cra.use_triton(q)
    out, lse = cra.chunk_routed_attention(q, k, v, cs, sel)
    ref = chunk_routed_attention_naive(q, k, v, cs, sel)
    torch.testing.assert_close((out, lse), ref, atol=0, rtol=0)


# ----------------------------------------------------------------------------- input validation


def test_bad_inputs_raise() -> None:
    (q, k, v, cs, sel), _ = make_case("fp32_ragged")
    for fn in (chunk_routed_attention_naive, chunk_routed_attention_triton):
        if fn is chunk_routed_attention_triton and not cra.HAS_TRITON:
            continue
        with pytest.raises(ValueError, match="4-D"):
            fn(q[0], k, v, cs, sel)
        with pytest.raises(ValueError, match="one dtype"):
            fn(q.half(), k, v, cs, sel)
        with pytest.raises(ValueError, match="same shape"):
            fn(q, k, v[:, :, :16], cs, sel)
        with pytest.raises(ValueError, match="to match q"):
            fn(q, k[:, :1], v[:, :1], cs, sel)
        with pytest.raises(ValueError, match="chunk_start must be a 1-D integer"):
            fn(q, k, v, cs.float(), sel)
        with pytest.raises(ValueError, match="non-decreasing from 0 to S_kv=50"):
            fn(q, k, v, torch.tensor([0, 8, 49], dtype=torch.int32), sel[..., :2])
        with pytest.raises(ValueError, match="non-decreasing"):
            fn(q, k, v, torch.tensor([0, 30, 20, 50]), sel[..., :3])
        with pytest.raises(ValueError, match="n_chunks=7 columns"):
            fn(q, k, v, cs, sel[..., :3])
        with pytest.raises(ValueError, match="one row per query"):
            fn(q, k, v, cs, sel[:, :, :10])
        with pytest.raises(ValueError, match=r"\[0, n_chunks=7\)"):
            fn(q, k, v, cs, torch.full((2, 2, 50, 1), 7, dtype=torch.int32))
        with pytest.raises(ValueError, match="bool chunk mask"):
            fn(q, k, v, cs, sel[0])


def test_triton_specific_errors() -> None:
    if not cra.HAS_TRITON:
        pytest.skip("triton is not installed")
    (q, k, v, cs, sel), _ = make_case("fp32_ragged")
    with pytest.raises(ValueError, match="head dims"):
        chunk_routed_attention_triton(q[..., :8], k[..., :8], v[..., :8], cs, sel)
    with pytest.raises(ValueError, match="block_m"):
        chunk_routed_attention_triton(q, k, v, cs, sel, block_m=8)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        chunk_routed_attention_triton(q.double(), k.double(), v.double(), cs, sel)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
