"""Tests for mmeff.kernels.block_sparse_attn (naive reference, Triton kernel, layout, pooling).

Triton comparisons run in ONE subprocess started by a module-scoped fixture: this file is
re-executed as a script (``--worker``) with ``TRITON_INTERPRET=1`` (CPU) and
``MMEFF_FORCE_TRITON=1`` in the child's environment only. Triton decides interpreter vs GPU
at ``@triton.jit`` time, i.e. when the kernel module is imported, so setting the variable in
this process (or a conftest) would leak into every kernel imported later in the session.
The worker saves the Triton outputs; the tests rebuild the same seeded inputs here and
compare against the naive reference. With a CUDA device the worker runs the real kernel.
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

import mmeff.kernels.block_sparse_attn as bsa
from mmeff.kernels.block_sparse_attn import (
    block_abs_deviation,
    block_mean,
    block_sparse_attention_naive,
    block_sparse_attention_triton,
    full_block_indices,
    indices_to_mask,
    mask_to_indices,
    num_blocks,
)



# ----------------------------------------------------------------------------- input builders


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def make_case(name: str) -> tuple[tuple, dict]:
    """Seeded inputs ``(args, kwargs)`` for a Triton-vs-naive case (CPU tensors)."""
    spec = dict(CASES[name])
    gen = torch.Generator().manual_seed(spec.pop("seed", 0))
    b, h, sq, skv, d = spec["B"], spec["H"], spec["Sq"], spec["Skv"], spec["D"]
    bm, bn, dtype = spec["bm"], spec["bn"], spec["dtype"]
    q = _rand(gen, b, h, sq, d, dtype=dtype)
    k = _rand(gen, b, h, skv, d, dtype=dtype)
    v = _rand(gen, b, h, skv, d, dtype=dtype)
    if spec.get("strided"):  # q/k/v as [B, H, S, D] views of [B, S, H, D] tensors
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    nq, nk = num_blocks(sq, bm), num_blocks(skv, bn)
    density = spec.get("density", 0.5)
    mask = torch.rand(b, h, nq, nk, generator=gen) < density
    mask[0, 0, 0] = False  # always one empty row
    mask[0, -1, -1] = True  # and one full row
    if spec.get("empty"):
        mask[:] = False
    idx, cnt = mask_to_indices(mask, max_k=spec.get("max_k"))
    if spec.get("shuffle"):  # order of listed blocks must not matter
        valid = torch.arange(idx.shape[-1]) < cnt[..., None]
        keyed = torch.where(valid, torch.rand(idx.shape, generator=gen), torch.full(idx.shape, 2.0))
        idx = torch.gather(idx, -1, keyed.argsort(-1)).contiguous()
    kwargs: dict = {"block_m": bm, "block_n": bn}
    if spec.get("kv_len") is not None:
        kwargs["kv_len"] = torch.tensor(spec["kv_len"], dtype=torch.int32)
    if spec.get("epilogue"):
        kwargs["row_scale"] = torch.rand(b, h, nq, generator=gen) + 0.5
        kwargs["row_add"] = _rand(gen, b, h, nq, d)
    if spec.get("scale") is not None:
        kwargs["scale"] = spec["scale"]
    return (q, k, v, idx, cnt), kwargs


_BASE = {"B": 2, "H": 2, "Sq": 50, "Skv": 45, "D": 16, "bm": 16, "bn": 16, "dtype": torch.float32}
CASES: dict[str, dict] = {
    "fp32_ragged": {**_BASE, "seed": 1},
    "bf16_ragged": {**_BASE, "seed": 2, "dtype": torch.bfloat16},
    "fp16_ragged": {**_BASE, "seed": 3, "dtype": torch.float16},
    "fp32_kv_len": {**_BASE, "seed": 4, "kv_len": [45, 20], "density": 0.7},
    "bf16_kv_len_epilogue": {**_BASE, "seed": 5, "dtype": torch.bfloat16, "kv_len": [33, 17], "epilogue": True},
    "fp32_epilogue": {**_BASE, "seed": 6, "epilogue": True, "scale": 0.3},
    "fp32_all_empty": {**_BASE, "seed": 7, "empty": True},
    "fp32_all_empty_max_k0": {**_BASE, "seed": 8, "empty": True, "max_k": 0, "epilogue": True},
    "fp32_dense_list": {**_BASE, "seed": 9, "density": 1.1, "Sq": 64, "Skv": 64},
    "fp32_bm32_bn16_d32": {**_BASE, "seed": 10, "bm": 32, "bn": 16, "D": 32, "Sq": 40, "Skv": 64},
    "fp32_strided_shuffled": {**_BASE, "seed": 11, "strided": True, "shuffle": True},
    "bf16_bm16_bn32_d64": {**_BASE, "seed": 12, "dtype": torch.bfloat16, "bn": 32, "D": 64, "Sq": 20, "Skv": 60},
}


STATS_CASES: dict[str, dict] = {
    "fp32_ragged": {"shape": (2, 3, 37, 16), "block": 16, "dtype": torch.float32},
    "bf16_ragged": {"shape": (1, 2, 50, 24), "block": 16, "dtype": torch.bfloat16},
    "fp32_block12_d8": {"shape": (2, 2, 30, 8), "block": 12, "dtype": torch.float32},
    "fp32_strided": {"shape": (2, 3, 64, 32), "block": 32, "dtype": torch.float32, "strided": True},
    "fp16_short": {"shape": (1, 1, 5, 16), "block": 8, "dtype": torch.float16},
}


def make_stats_case(name: str) -> tuple[torch.Tensor, int]:
    """Seeded ``x [B, H, S, D]`` and block for a fused pooled-statistics case (CPU)."""
    spec = STATS_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    x = (torch.randn(*spec["shape"], generator=gen) * 2 + 0.5).to(spec["dtype"])
    if spec.get("strided"):
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x, spec["block"]


def _tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"atol": 1e-5, "rtol": 1e-5}
    return {"atol": 3e-2, "rtol": 3e-2}


# ----------------------------------------------------------------------------- Triton worker


def _worker(out_path: str) -> None:
    """Run every case through the Triton path and save the outputs (subprocess entry point)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {"meta": {"interpreted": bsa.triton_kernel._is_interpreted(), "device": dev}}
    for name in CASES:
        args, kwargs = make_case(name)
        args = tuple(a.to(dev) for a in args)
        kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        if name == "fp32_ragged":  # also go through the public dispatcher
            results["meta"]["dispatch_uses_triton"] = bsa.use_triton(args[0])
            out, lse = bsa.block_sparse_attention(*args, **kwargs)
        else:
            out, lse = block_sparse_attention_triton(*args, **kwargs)
        results[name] = (out.cpu(), lse.cpu())
    for name in STATS_CASES:
        x, block = make_stats_case(name)
        x = x.to(dev)
        if name == "fp32_ragged":
            results["meta"]["stats_dispatch_uses_triton"] = bsa.use_triton(x)
            mean, mad = bsa.block_stats(x, block)
        else:
            mean, mad = bsa.block_stats_triton(x, block)
        results[f"stats_{name}"] = (mean.cpu(), mad.cpu())
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def triton_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not bsa.HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_worker(__file__, tmp_path_factory.mktemp("bsa") / "triton_outputs.pt")


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_naive(triton_outputs: dict, name: str) -> None:
    args, kwargs = make_case(name)
    ref_out, ref_lse = block_sparse_attention_naive(*args, **kwargs)
    out, lse = triton_outputs[name]
    assert out.dtype == args[0].dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), **_tolerances(args[0].dtype))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4 if args[0].dtype == torch.float32 else 2e-3, rtol=1e-4)


def test_triton_worker_meta(triton_outputs: dict) -> None:
    meta = triton_outputs["meta"]
    assert meta["dispatch_uses_triton"] is True
    assert meta["interpreted"] == (meta["device"] == "cpu")


def test_triton_empty_rows(triton_outputs: dict) -> None:
    out, lse = triton_outputs["fp32_all_empty"]
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # With an epilogue an empty row is just row_add.
    args, kwargs = make_case("fp32_all_empty_max_k0")
    out, lse = triton_outputs["fp32_all_empty_max_k0"]
    expect = kwargs["row_add"].repeat_interleave(16, dim=2)[:, :, : args[0].shape[2]]
    torch.testing.assert_close(out, expect)
    assert torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("name", list(STATS_CASES))
def test_fused_block_stats_match_torch_twin(triton_outputs: dict, name: str) -> None:
    x, block = make_stats_case(name)
    mean_ref, mad_ref = bsa.block_stats_naive(x, block)
    mean, mad = triton_outputs[f"stats_{name}"]
    assert mean.dtype == mad.dtype == torch.float32 and mean.shape == mean_ref.shape == mad.shape
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mad, mad_ref, atol=1e-5, rtol=1e-5)
    assert triton_outputs["meta"]["stats_dispatch_uses_triton"] is True


def test_fused_block_stats_errors() -> None:
    x = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        bsa.block_stats_triton(x[0], 4)
    with pytest.raises(ValueError, match="positive int"):
        bsa.block_stats_triton(x, 0)
    with pytest.raises(ValueError, match="register tile"):
        bsa.block_stats_triton(torch.randn(1, 1, 8, 256), 512)
    mean, mad = bsa.block_stats(x, 4)  # CPU without the force flag: the torch twin
    torch.testing.assert_close(mean, block_mean(x, 4))
    torch.testing.assert_close(mad, block_abs_deviation(x, 4))


# ----------------------------------------------------------------------------- naive reference


def _dense_case(sq: int, skv: int, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (_rand(gen, 2, 3, sq, d), _rand(gen, 2, 3, skv, d), _rand(gen, 2, 3, skv, d))


@pytest.mark.parametrize("sq,skv,bm,bn", [(64, 64, 16, 16), (50, 37, 16, 32), (7, 70, 32, 16)])
def test_naive_full_list_equals_sdpa(sq: int, skv: int, bm: int, bn: int) -> None:
    q, k, v = _dense_case(sq, skv)
    idx, cnt = full_block_indices(2, 3, num_blocks(sq, bm), num_blocks(skv, bn))
    out, lse = block_sparse_attention_naive(q, k, v, idx, cnt, block_m=bm, block_n=bn)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-5)


def _independent_masked_attention(q, k, v, block_mask, bm, bn, scale, kv_len=None):
    """Dense masked softmax with the token mask built by explicit loops over blocks."""
    b_, h_, sq, _ = q.shape
    skv = k.shape[2]
    tok = torch.zeros(b_, h_, sq, skv, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            for i in range(block_mask.shape[2]):
                for j in range(block_mask.shape[3]):
                    if block_mask[b, h, i, j]:
                        tok[b, h, i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = True
            if kv_len is not None:
                tok[b, :, :, int(kv_len[b]) :] = False
    logits = (q @ k.transpose(-1, -2)) * scale
    out = torch.zeros_like(q)
    lse = torch.full((b_, h_, sq), float("-inf"))
    for b in range(b_):
        for h in range(h_):
            for r in range(sq):
                cols = tok[b, h, r]
                if cols.any():
                    row = logits[b, h, r, cols]
                    out[b, h, r] = torch.softmax(row, -1) @ v[b, h, cols]
                    lse[b, h, r] = torch.logsumexp(row, -1)
    return out, lse


@pytest.mark.parametrize("kv_len", [None, [37, 12]])
def test_naive_random_mask_matches_independent(kv_len) -> None:
    q, k, v = _dense_case(50, 37, seed=3)
    bm, bn = 16, 8
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 3, num_blocks(50, bm), num_blocks(37, bn), generator=gen) < 0.4
    mask[1, 2, 3] = False
    idx, cnt = mask_to_indices(mask)
    kvl = None if kv_len is None else torch.tensor(kv_len)
    out, lse = block_sparse_attention_naive(q, k, v, idx, cnt, block_m=bm, block_n=bn, scale=0.7, kv_len=kvl)
    ref_out, ref_lse = _independent_masked_attention(q, k, v, mask, bm, bn, 0.7, kv_len)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 2, 48:] == 0)  # query block 3 of (b=1, h=2) attends nothing


def test_naive_epilogue() -> None:
    q, k, v = _dense_case(40, 40, seed=5)
    idx, cnt = full_block_indices(2, 3, 3, 3)
    rs = torch.rand(2, 3, 3)
    ra = torch.randn(2, 3, 3, 16)
    out, lse = block_sparse_attention_naive(q, k, v, idx, cnt, block_m=16, block_n=16, row_scale=rs, row_add=ra)
    base, base_lse = block_sparse_attention_naive(q, k, v, idx, cnt, block_m=16, block_n=16)
    rows = torch.arange(40) // 16
    torch.testing.assert_close(out, base * rs[:, :, rows, None] + ra[:, :, rows])
    torch.testing.assert_close(lse, base_lse)


def test_dispatcher_uses_naive_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMEFF_FORCE_TRITON", raising=False)
    q, k, v = _dense_case(20, 20)
    idx, cnt = full_block_indices(2, 3, 2, 2)
    assert not bsa.use_triton(q)
    out, _ = bsa.block_sparse_attention(q, k, v, idx, cnt, block_m=16, block_n=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- layout


def test_mask_to_indices_roundtrip() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 7, generator=gen) < 0.4
    mask[0, 0, 0] = False
    idx, cnt = mask_to_indices(mask)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert idx.shape[-1] == int(mask.sum(-1).max())
    assert torch.equal(cnt, mask.sum(-1).int())
    for b, h, i in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        c = int(cnt[b, h, i])
        assert idx[b, h, i, :c].tolist() == mask[b, h, i].nonzero().flatten().tolist()  # ascending
        assert torch.all(idx[b, h, i, c:] == -1)
    assert torch.equal(indices_to_mask(idx, cnt, 7), mask)
    wide, wide_cnt = mask_to_indices(mask, max_k=7)
    assert wide.shape[-1] == 7 and torch.equal(indices_to_mask(wide, wide_cnt, 7), mask)
    with pytest.raises(ValueError, match="max_k"):
        mask_to_indices(torch.ones(1, 1, 2, 4, dtype=torch.bool), max_k=2)


def test_full_block_indices() -> None:
    idx, cnt = full_block_indices(1, 2, 3, 4)
    assert torch.all(indices_to_mask(idx, cnt, 4))


def test_bad_indices_raise() -> None:
    q, k, v = _dense_case(32, 32)
    idx, cnt = full_block_indices(2, 3, 2, 2)
    call = lambda i, c: block_sparse_attention_naive(q, k, v, i, c, block_m=16, block_n=16)
    dup = idx.clone()
    dup[0, 0, 0, 1] = 0
    with pytest.raises(ValueError, match="twice"):
        call(dup, cnt)
    oob = idx.clone()
    oob[0, 0, 0, 1] = 2
    with pytest.raises(ValueError, match="n_kblk"):
        call(oob, cnt)
    with pytest.raises(ValueError, match="kv_block_count"):
        call(idx, cnt.clone().fill_(3))
    with pytest.raises(ValueError, match="n_qblk"):
        call(idx[:, :, :1], cnt[:, :, :1])
    with pytest.raises(ValueError, match=r"\[B, H, n_qblk, max_k\]"):
        call(idx[0], cnt[0])


# ----------------------------------------------------------------------------- input validation


def test_bad_inputs_raise() -> None:
    q, k, v = _dense_case(32, 32)
    idx, cnt = full_block_indices(2, 3, 2, 2)
    kw = {"block_m": 16, "block_n": 16}
    for fn in (block_sparse_attention_naive, block_sparse_attention_triton):
        with pytest.raises(ValueError, match="4-D"):
            fn(q[0], k, v, idx, cnt, **kw)
        with pytest.raises(ValueError, match="one dtype"):
            fn(q.half(), k, v, idx, cnt, **kw)
        with pytest.raises(ValueError, match="same shape"):
            fn(q, k, v[:, :, :16], idx, cnt, **kw)
        with pytest.raises(ValueError, match="to match q"):
            fn(q, k[:, :2], v[:, :2], idx, cnt, **kw)
        with pytest.raises(ValueError, match="kv_len"):
            fn(q, k, v, idx, cnt, kv_len=torch.tensor([1.0, 2.0]), **kw)
        with pytest.raises(ValueError, match="row_scale"):
            fn(q, k, v, idx, cnt, row_scale=torch.ones(2, 3), **kw)
        with pytest.raises(ValueError, match="row_add"):
            fn(q, k, v, idx, cnt, row_add=torch.ones(2, 3, 2, 8), **kw)
        with pytest.raises(ValueError, match="block_m"):
            fn(q, k, v, idx, cnt, block_m=0, block_n=16)


def test_triton_specific_errors() -> None:
    if not bsa.HAS_TRITON:
        pytest.skip("triton is not installed")
    q, k, v = _dense_case(32, 32, d=24)
    idx, cnt = full_block_indices(2, 3, 2, 2)
    with pytest.raises(ValueError, match="head dims"):
        block_sparse_attention_triton(q, k, v, idx, cnt, block_m=16, block_n=16)
    q, k, v = _dense_case(32, 32)
    with pytest.raises(ValueError, match="block_n"):
        block_sparse_attention_triton(q, k, v, full_block_indices(2, 3, 2, 4)[0], cnt.clone(), block_m=16, block_n=8)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        block_sparse_attention_triton(q.double(), k.double(), v.double(), idx, cnt, block_m=16, block_n=16)


# ----------------------------------------------------------------------------- pooled helpers


def _loop_stats(x: torch.Tensor, block: int, valid: int):
    n = num_blocks(x.shape[-2], block)
    means, devs = [], []
    for i in range(n):
        seg = x[..., i * block : min((i + 1) * block, valid), :].double()
        if seg.shape[-2] == 0:
            means.append(torch.zeros(*x.shape[:-2], x.shape[-1], dtype=torch.float64))
            devs.append(torch.zeros(*x.shape[:-2], x.shape[-1], dtype=torch.float64))
            continue
        mu = seg.mean(-2)
        means.append(mu)
        devs.append((seg - mu.unsqueeze(-2)).abs().mean(-2))
    return torch.stack(means, -2).float(), torch.stack(devs, -2).float()


@pytest.mark.parametrize("seq,block", [(64, 16), (37, 16), (5, 8)])
def test_pooled_helpers_match_loops(seq: int, block: int) -> None:
    x = torch.randn(2, 3, seq, 8, generator=torch.Generator().manual_seed(seq))
    mean_ref, dev_ref = _loop_stats(x, block, seq)
    torch.testing.assert_close(block_mean(x, block), mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block_abs_deviation(x, block), dev_ref, atol=1e-5, rtol=1e-5)
    assert block_mean(x.bfloat16(), block).dtype == torch.float32


def test_pooled_helpers_valid_len() -> None:
    x = torch.randn(2, 3, 40, 8, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([40, 13])
    mean, dev = block_mean(x, 16, valid_len=valid), block_abs_deviation(x, 16, valid_len=valid)
    for b in range(2):
        mean_ref, dev_ref = _loop_stats(x[b], 16, int(valid[b]))
        torch.testing.assert_close(mean[b], mean_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dev[b], dev_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(mean[1, :, 1:] == 0)  # blocks past the valid length are zero
    torch.testing.assert_close(block_mean(x, 16, valid_len=13), _loop_stats(x, 16, 13)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="valid_len"):
        block_mean(x, 16, valid_len=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="block"):
        block_mean(x, 0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])


def test_default_num_stages_fits_shared_memory() -> None:
    from mmeff.kernels._common import default_num_stages

    # Measured on an H100: bf16 128x128 tiles at d=128 run fastest with 3 stages; 4 do not fit.
    assert default_num_stages(128, 128, 128, 2) == 3
    assert default_num_stages(64, 64, 64, 2) == 3
    # fp32 doubles the tiles: two stages of 128x128 no longer fit.
    assert default_num_stages(128, 128, 128, 4) == 1
    assert default_num_stages(128, 64, 128, 4) == 2
