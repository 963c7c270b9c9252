"""The shipped tiny-wan (a real WanPipeline) loads offline and generates a short video; the video fidelity metrics
(own SSIM / PSNR) behave; video_fidelity writes its JSON and strip on a 1-prompt 2-step run; Rectified SpaAttn with
drop=0 reproduces dense exactly on the loaded pipeline."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff.eval.video_fidelity import (
    _sparsity,
    default_methods,
    evaluate,
    psnr,
    ssim,
    ssim_skimage,
    vmoba_topk,
)
from mmeff.video import RectifiedSpaAttn, VMoBA
from mmeff.zoo.load_video import MODELS_DIR, TINY_WAN_CALL, load_video_pipeline

from .conftest import load_offline

pytestmark = pytest.mark.usefixtures("one_thread")
WAN_DIR = MODELS_DIR / "tiny-wan"
SHORT = {**TINY_WAN_CALL, "num_frames": 5}  # 2 latent frames: grid 2 x 8 x 8


@pytest.fixture(scope="module")
def wan():
    return load_offline(load_video_pipeline, "tiny-wan")


def test_tiny_wan_ships_with_the_package():
    assert (WAN_DIR / "model_index.json").is_file()


def _call(steps: int = 2, seed: int = 0, **kw):
    return {"prompt": "a large red circle and a small blue square on a white background", "num_inference_steps": steps,
            "guidance_scale": 5.0, "generator": torch.Generator().manual_seed(seed), **SHORT, **kw}


def test_loads_offline_as_wan_pipeline_and_generates(wan):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    assert isinstance(wan, WanPipeline)
    assert isinstance(wan.transformer, WanTransformer3DModel) and isinstance(wan.vae, AutoencoderKLWan)
    info = json.loads((WAN_DIR / "training.json").read_text())
    assert info["video_tokens"] == 256 and info["latent_shape"] == [8, 4, 16, 16]
    out = wan(**_call(output_type="np"))
    frames = torch.as_tensor(out.frames)
    assert frames.shape == (1, 5, 64, 64, 3)
    assert torch.isfinite(frames).all() and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    assert float(frames.std()) > 0.01  # not a constant image


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(psnr(x, x)) == pytest.approx(100.0)
    prev_p, prev_s = float("inf"), 1.0
    for sigma in (0.01, 0.05, 0.2):
        y = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        p, s = float(psnr(y, x)), float(ssim(y, x))
        assert p < prev_p and s < prev_s
        prev_p, prev_s = p, s
    assert float(psnr(x + 0.1, x)) == pytest.approx(20.0, abs=1e-6)  # MSE 0.01
    assert float(ssim(x, 1 - x)) < 0.0  # anti-correlated


def test_torch_ssim_equals_scikit_image():
    """The demo's torch SSIM is the twin of the scikit-image SSIM the fidelity JSON reports."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 40, 36, generator=g)
    for y in (x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1), torch.rand(x.shape, generator=g)):
        assert float(ssim(x, y)) == pytest.approx(ssim_skimage(x, y), abs=1e-9)


def test_vmoba_topk_follows_the_drop_but_never_routes_top1():
    assert [vmoba_topk(d, 64) for d in (0.5, 0.75, 0.9)] == [32, 16, 6]
    assert vmoba_topk(0.9, 4) == 2


def test_fine_layout_skips_what_the_drop_asks_where_the_paper_layout_cannot(wan):
    """On tiny-wan's 256-token grid, block 16 + a dense first frame + tau leave drop 0.9 near 0.5 sparsity;
    4-token blocks with tau 0 and no dense rule get the drop's floor minus the always-kept 3-D neighbours."""
    call = _call(steps=2, output_type="latent")
    measured = {}
    for layout in ("paper", "fine"):
        conf = default_methods(block=16 if layout == "paper" else 4, warmup=0, layout=layout)["blocksparse_d90"]()
        with mmeff.apply(wan, conf) as h:
            wan(**{**call, "generator": torch.Generator().manual_seed(0)})
        measured[layout] = _sparsity(h.report())["sparsity_sparse_calls"]
    assert measured["paper"] < 0.6 < measured["fine"]
    from mmeff.core.errors import ConfigError

    with pytest.raises(ConfigError, match="layout"):
        default_methods(layout="coarse")


def test_drop_zero_reproduces_dense_exactly(wan):
    ref = wan(**_call(output_type="latent")).frames
    with mmeff.apply(wan, RectifiedSpaAttn(drop=0.0, block=16, preset="none")):
        out = wan(**_call(output_type="latent")).frames
    assert torch.equal(out, ref)
    with mmeff.apply(wan, RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none")) as h:
        sparse = wan(**_call(output_type="latent")).frames
    assert h.report()["per_method"]["rectified_spaattn"]["calls"]["sparse"] > 0
    assert not torch.equal(sparse, ref)


def test_video_fidelity_writes_json_and_strip(tmp_path, wan):
    methods = {
        "rectified_d75": lambda: RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none"),
        "vmoba_k1": lambda: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk",
                                  topk=(1, 1, 2)),
    }
    out = tmp_path / "vf.json"
    doc = evaluate("tiny-wan", out=out, n=1, steps=2, warmup=0, methods=methods, other_seed=False, call=SHORT,
                   keep_videos=1, quiet=True)
    saved = json.loads(out.read_text())
    assert saved["config"]["n_prompts"] == 1 and saved["config"]["steps"] == 2
    assert set(saved["results"]) == {"dense", "rectified_d75", "vmoba_k1"}
    for name in methods:
        r = saved["results"][name]
        assert 0.0 < r["psnr"]["mean"] <= 100.0 and -1.0 <= r["ssim"]["mean"] <= 1.0
        assert 0.0 < r["sparsity_sparse_calls"] < 1.0 and r["seconds_per_video"]["mean"] > 0
    assert saved["versions"]["diffusers"] and (tmp_path / "vf.png").stat().st_size > 0
    assert doc["results"]["rectified_d75"]["psnr"] == saved["results"]["rectified_d75"]["psnr"]


def test_training_continues_the_shipped_pipeline(tmp_path):
    """``--init-from`` starts from the saved weights and counters: a few more diffusion steps, the
    VAE and its latent statistics untouched (its minutes are already spent), the report cumulative."""
    from mmeff.zoo.train_wan import build_pipeline, load_saved, saved_arch, train

    before = json.loads((WAN_DIR / "training.json").read_text())
    family = before.get("prompt_family", "world")  # the shipped model's prompts decide its tokenizer
    arch = saved_arch(None, WAN_DIR)  # and its transformer's size
    pipe = build_pipeline(data=family, **arch)
    state = load_saved(pipe, WAN_DIR, vae_minutes=before["vae"]["minutes"])
    assert state["step"] == before["diffusion"]["steps"] and state["phase"] == 1
    shipped = load_offline(load_video_pipeline, "tiny-wan")
    for a, b in zip(pipe.transformer.state_dict().values(), shipped.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert load_saved(build_pipeline(data=family, **arch), WAN_DIR, vae_minutes=before["vae"]["minutes"] + 1)["phase"] == 0
    spent = before["vae"]["minutes"] + before["diffusion"]["minutes"]
    info = train(spent + 0.03, vae_minutes=before["vae"]["minutes"], batch=2, out_dir=tmp_path / "out",
                 ckpt_dir=tmp_path / "ckpt", init_from=WAN_DIR, log_every=1)
    assert info["diffusion"]["steps"] > before["diffusion"]["steps"]
    assert info["vae"]["steps"] == before["vae"]["steps"]
    assert info["vae"]["latents_mean"] == before["vae"]["latents_mean"]
    assert info["initialised_from"] == str(WAN_DIR)
    saved_tok = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text())
    assert saved_tok["padding"] is None and saved_tok["truncation"] is None  # same tokenizer as shipped
    with pytest.raises(FileNotFoundError, match="training.json"):
        load_saved(build_pipeline(), tmp_path, vae_minutes=1.0)
