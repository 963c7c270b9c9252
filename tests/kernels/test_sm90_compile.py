"""Compile the newer Triton kernels for an H100 (sm_90) on the CPU: no GPU is needed to run Triton's
front end, its GPU passes and ptxas, so errors that the CPU interpreter never raises (non-constexpr
globals, type mismatches in loops, shared memory above the 227 KB an H100 block may use) fail here."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmeff.kernels._common import HAS_TRITON  # noqa: E402

H100_SHARED_BYTES = 227 * 1024
TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...], options: dict):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=TARGET, options=options)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("mode,n_chunks", [("topk", 455), ("threshold", 455), ("threshold", 2048)])
def test_router_compiles_for_sm90(mode: str, n_chunks: int) -> None:
    from mmeff.kernels.chunk_routing.triton_kernel import MAX_CHUNKS, _route_kernel, launch_config

    assert n_chunks <= MAX_CHUNKS
    cfg = launch_config(n_chunks, 128)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    kernel = _compile(_route_kernel,
                      {"Q": "*bf16", "KBAR": "*fp32", "QCHUNK": "*i32", "OUT": "*i32" if mode == "topk" else "*i8"},
                      {"TOPK_MODE": mode == "topk", "HEAD_DIM": 128, "BISECT_STEPS": 31, **cfg}, ("threshold",), options)
    assert "cubin" in kernel.asm and kernel.metadata.shared <= H100_SHARED_BYTES


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_key_major_kernels_compile_for_sm90() -> None:
    from mmeff.kernels.chunk_routed_attn.key_major import _km_merge_kernel, _km_partial_kernel, launch_options

    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "PO": "*bf16", "PL": "*fp32", "PAIR_QUERY": "*i32",
            "GROUP_START": "*i32", "TILE_GROUP": "*i32", "TILE_FIRST": "*i32", "CSTART": "*i32"}
    consts = {"BLOCK_M": 64, "BLOCK_N": 32, "HEAD_DIM": 128, "DOT_PRECISION": "tf32", "DOT_IN_FP32": False}
    partial = _compile(_km_partial_kernel, ptrs, consts, ("qk_scale",), launch_options(64, 32, 128, 2))
    assert partial.metadata.shared <= H100_SHARED_BYTES
    merge = _compile(_km_merge_kernel, {"PO": "*bf16", "PL": "*fp32", "IDX": "*i32", "SLOT_PAIR": "*i32",
                                        "O": "*bf16", "LSE": "*fp32"}, {"BLOCK_M": 32, "HEAD_DIM": 128}, (),
                     {"num_warps": 4})
    assert "cubin" in partial.asm and "cubin" in merge.asm


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_query_major_kernel_compiles_for_sm90() -> None:
    from mmeff.kernels._common import default_num_stages
    from mmeff.kernels.chunk_routed_attn.triton_kernel import _cra_fwd_kernel

    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "SEL": "*u8", "TIDX": "*i32",
            "TCNT": "*i32", "CSTART": "*i32"}
    consts = {"BLOCK_M": 64, "BLOCK_N": 32, "HEAD_DIM": 128, "DOT_PRECISION": "tf32", "DOT_IN_FP32": False}
    kernel = _compile(_cra_fwd_kernel, ptrs, consts, ("qk_scale",),
                      {"num_warps": 4, "num_stages": default_num_stages(64, 32, 128, 2)})
    assert "cubin" in kernel.asm and kernel.metadata.shared <= H100_SHARED_BYTES


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("row_terms", [False, True])
def test_block_sparse_kernel_compiles_for_sm90(row_terms: bool) -> None:
    """The kernel measured on the H100 (2026-11-22), now built on the shared online-softmax step."""
    from mmeff.kernels._common import default_num_stages
    from mmeff.kernels.block_sparse_attn.triton_kernel import _bsa_fwd_kernel, _default_num_warps

    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "IDX": "*i32", "CNT": "*i32",
            "KVLEN": "*i32", "RS": "*fp32", "RA": "*bf16"}
    consts = {"HAS_KVLEN": row_terms, "HAS_ROW_SCALE": row_terms, "HAS_ROW_ADD": row_terms, "BLOCK_M": 64,
              "BLOCK_N": 64, "HEAD_DIM": 128, "DOT_PRECISION": "tf32", "DOT_IN_FP32": False}
    kernel = _compile(_bsa_fwd_kernel, ptrs, consts, ("qk_scale",),
                      {"num_warps": _default_num_warps(64, 64, 128), "num_stages": default_num_stages(64, 64, 128, 2)})
    assert "cubin" in kernel.asm and kernel.metadata.shared <= H100_SHARED_BYTES
