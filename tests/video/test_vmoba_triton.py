"""VMoBA through the Triton path end to end: the shipped tiny-wan transformer (head dim 16) with VMoBA
applied, run once with the fused router + key-major / query-major kernels (a worker subprocess with
``TRITON_INTERPRET=1`` on CPU, the real kernels on a GPU) and once on the torch path; outputs must agree."""
from __future__ import annotations

import sys

import pytest
import torch

try:
    from ..kernels.triton_worker import run_worker
except ImportError:  # executed as the worker script
    run_worker = None

import mmeff
from mmeff.video import VMoBA

SETTINGS = {
    "topk": dict(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk", topk=(2, 3, 3),
                 first_full_layer=0),
    "threshold": dict(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="threshold",
                      threshold=0.3, first_full_layer=0),
}


def _transformer_and_inputs() -> tuple[torch.nn.Module, dict]:
    from mmeff.zoo.load_video import load_video_pipeline

    tr = load_video_pipeline("tiny-wan").transformer.float().eval()
    g = torch.Generator().manual_seed(0)
    cfg = tr.config
    latent = torch.randn(1, cfg.in_channels, 4, 16, 16, generator=g)  # grid 4 x 8 x 8 after 1x2x2 patches
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    return tr, {"hidden_states": latent, "timestep": torch.tensor([500]), "encoder_hidden_states": text}


def _run(name: str) -> tuple[torch.Tensor, dict]:
    tr, kw = _transformer_and_inputs()
    with mmeff.apply(tr, VMoBA(**SETTINGS[name])) as h, torch.no_grad():
        out = tr(**kw, return_dict=False)[0]
    return out, h.report()["per_method"]["vmoba"]


def _worker(out_path: str) -> None:
    from mmeff.kernels.chunk_routing import triton_routes

    res = {"routes_with_triton": triton_routes(torch.zeros(1, 1, 1, 16), 16)}
    for name in SETTINGS:
        out, rep = _run(name)
        res[name] = (out.cpu(), rep["sparsity_per_layer"])
    torch.save(res, out_path)


@pytest.fixture(scope="module")
def triton_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mmeff.kernels.chunk_routing import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return run_worker(__file__, tmp_path_factory.mktemp("vmoba_triton") / "out.pt")


@pytest.mark.parametrize("name", list(SETTINGS))
def test_tiny_wan_vmoba_triton_equals_torch(triton_outputs: dict, name: str) -> None:
    assert triton_outputs["routes_with_triton"] is True
    got, sparsity = triton_outputs[name]
    torch.set_num_threads(1)
    expect, rep = _run(name)
    assert sparsity == pytest.approx(rep["sparsity_per_layer"])
    assert max(sparsity.values()) > 0.2  # really sparse
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=2e-4)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
