"""The GPU training call (``mmeff.zoo.train_gpu``) in its CPU smoke mode: it trains both zoo diffusion models from
the shipped weights under a deadline, packs checkpoint + export into <= 15 MiB parts with a summary, and the CPU
trainers resume from what it packed (step count carried on, the trained weights loaded)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from mmeff.zoo.bundle import PART_BYTES, pack, unpack
from mmeff.zoo.train_gpu import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke call (both models, 3 steps each, quick fidelity) and its parts unpacked as a CPU session would.
    The steps, not the clock, end the smoke run, so a loaded machine cannot make it skip a model."""
    root = tmp_path_factory.mktemp("gpu")
    out, work = root / "out", root / "work"
    t0 = time.time()
    main(["--smoke", "--out", str(out), "--work", str(work), "--seconds", "300"])
    wall = time.time() - t0
    main(["--unpack", str(out), "--to", str(root / "back")])
    return {"out": out, "back": root / "back", "wall": wall,
            "summary": json.loads((out / "summary.json").read_text())}


def shipped_diffusion_steps(name: str) -> int:
    from mmeff.zoo.load_pipeline import MODELS_DIR

    return int(json.loads((MODELS_DIR / name / "training.json").read_text())["diffusion"]["steps"])


def test_smoke_call_trains_both_models_and_packs_them_within_the_limits(smoke):
    s = smoke["summary"]
    assert s["finished"] and s["mode"] == "smoke" and smoke["wall"] < 300
    files = sorted(p.name for p in smoke["out"].iterdir())
    assert len(files) <= 7  # the lease returns 8 files; the shell wrapper adds its log
    assert all(p.stat().st_size <= PART_BYTES for p in smoke["out"].iterdir())
    # the lease returns 64 MiB in all: the log and the device's headroom get what the call leaves
    assert sum(p.stat().st_size for p in smoke["out"].iterdir()) <= 56 * 1024 * 1024
    for name in ("tiny-sd3", "tiny-wan"):
        shipped_steps = shipped_diffusion_steps(name)
        m = s["models"][name]
        assert m["status"] == "trained", m
        assert m["diffusion_steps"] == shipped_steps + 3 and m["last_run"]["from_step"] == shipped_steps
        assert [p["file"] for p in m["parts"]] == [f"{name}.tar.{i:02d}" for i in range(len(m["parts"]))]
    assert s["models"]["tiny-wan"]["last_run"]["to_vae_step"] > s["models"]["tiny-wan"]["last_run"]["from_vae_step"]
    for name in ("tiny-sd3", "tiny-wan"):
        assert {"shipped", "new"} <= set(s["fidelity"][name])
    assert 0.0 <= s["fidelity"]["tiny-sd3"]["new"]["shape_existence_acc"] <= 1.0
    assert (smoke["out"] / "samples.png").stat().st_size > 0


def test_cpu_resumes_the_packed_sd3_checkpoint(smoke, tmp_path):
    from diffusers import SD3Transformer2DModel

    from mmeff.zoo.train_sd3 import build_pipeline, train

    ckpt_dir = smoke["back"] / "tiny-sd3" / "ckpt"
    ck = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)
    assert ck["opt_vae"] is None and ck["state"]["phase"] == 1  # slimmed for the trip
    gpu_steps = ck["state"]["step"]
    exported = SD3Transformer2DModel.from_pretrained(smoke["back"] / "tiny-sd3" / "model" / "transformer")
    for name, p in exported.named_parameters():  # the packed export is the packed checkpoint's EMA
        assert torch.equal(p, ck["ema"]["transformer"][name])
    minutes = (ck["state"]["vae_seconds"] + ck["state"]["diff_seconds"]) / 60
    info = train(minutes + 0.03, batch=2, pool_size=4, ckpt_dir=ckpt_dir, out_dir=tmp_path / "cpu", log_every=1)
    assert info["diffusion"]["steps"] > gpu_steps
    assert info["runs"][-1]["from_step"] == gpu_steps and info["runs"][-1]["device"] == "cpu"
    assert info["stage"]["step"] == shipped_diffusion_steps("tiny-sd3")  # the stage the GPU run began continues
    after = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)["transformer"]  # the CPU run's own checkpoint
    fresh = build_pipeline().transformer.state_dict()

    def dist(a: dict, b: dict) -> float:
        return float(sum((a[k].float() - b[k].float()).pow(2).sum() for k in b) ** 0.5)

    # the CPU run started from the packed weights: a few steps away from them, nowhere near a fresh start
    assert dist(after, ck["transformer"]) < 0.2 * dist(fresh, ck["transformer"])


def test_cpu_resumes_the_packed_wan_checkpoint(smoke, tmp_path):
    from mmeff.zoo.train_wan import build_pipeline, train

    ckpt_dir = smoke["back"] / "tiny-wan" / "ckpt"
    ck = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)
    gpu_steps = ck["state"]["step"]
    assert ck["state"]["recipe_config"]["image_batch"] == 2 and ck["state"]["image_steps"] >= 1  # joint image-video
    minutes = (ck["state"]["vae_seconds"] + ck["state"]["diff_seconds"]) / 60
    exported = train(minutes, ckpt_dir=ckpt_dir, out_dir=tmp_path / "export", export_only=True)
    assert exported["diffusion"]["steps"] == gpu_steps
    from diffusers import WanTransformer3DModel

    tr = WanTransformer3DModel.from_pretrained(tmp_path / "export" / "transformer")
    for name, p in tr.named_parameters():  # --export writes the checkpoint's EMA weights
        assert torch.equal(p, ck["ema"]["transformer"][name])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(1.0, ckpt_dir=tmp_path / "none", out_dir=tmp_path / "x", export_only=True)
    info = train(minutes + 0.02, batch=2, pool_size=2, new_per_step=1, ckpt_dir=ckpt_dir, out_dir=tmp_path / "cpu",
                 log_every=1)
    assert info["diffusion"]["steps"] > gpu_steps and info["runs"][-1]["from_step"] == gpu_steps
    assert info["vae"]["latents_mean"] == ck["state"]["latents_mean"]  # the GPU run's VAE statistics carried
    saved = json.loads((smoke["back"] / "tiny-wan" / "model" / "training.json").read_text())
    assert saved["stages"] and saved["runs"][-1]["device"] == "cpu"  # hand-written history + the smoke run
    assert info["diffusion"]["weights"].startswith("EMA")
    after = torch.load(ckpt_dir / "ckpt.pt", weights_only=False)
    for part in ("transformer", "vae"):  # the packed weights were loaded (the VAE is frozen: unchanged)
        fresh_pipe = build_pipeline(**ck["state"]["transformer_arch"])
        fresh = (fresh_pipe.transformer if part == "transformer" else fresh_pipe.vae).state_dict()
        d_after = sum(float((after[part][k] - ck[part][k]).pow(2).sum()) for k in ck[part])
        d_fresh = sum(float((fresh[k] - ck[part][k]).pow(2).sum()) for k in ck[part])
        assert d_after < 0.04 * d_fresh


def test_bundle_round_trips_in_parts_and_names_missing_parts(tmp_path):
    ckpt, model = tmp_path / "ck", tmp_path / "model"
    ckpt.mkdir()
    (model / "transformer").mkdir(parents=True)
    lin = torch.nn.Linear(40, 50)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    for _ in range(3):
        lin(torch.randn(8, 40)).pow(2).mean().backward()
        opt.step()
    torch.save({"state": {"phase": 1}, "opt_vae": {"big": torch.zeros(10)}, "w": torch.arange(5000.0),
                "opt": opt.state_dict()}, ckpt / "ckpt.pt")
    (model / "training.json").write_text('{"runs": ["gpu"]}')
    (model / "transformer" / "weights.bin").write_bytes(b"x" * 50_000)  # re-made on unpacking, never packed
    parts = pack("m", ckpt, model, tmp_path / "out", part_bytes=8192)
    assert len(parts) > 2 and all(p["bytes"] <= 8192 for p in parts)
    assert sum(p["bytes"] for p in parts) < 50_000

    def export(ckpt_dir, model_dir):  # what a trainer's export-only run does: weights + its own training.json
        (model_dir / "transformer").mkdir(parents=True)
        (model_dir / "transformer" / "weights.bin").write_bytes(b"y")
        (model_dir / "training.json").write_text('{"runs": ["export"]}')

    back = unpack("m", tmp_path / "out", tmp_path / "back", export=export)
    ck = torch.load(back / "ckpt" / "ckpt.pt", weights_only=False)
    assert torch.equal(ck["w"], torch.arange(5000.0)) and ck["opt_vae"] is None and ck["bundle"]["opt_vae_dropped"]
    assert (back / "transformer").exists() is False and (back / "model" / "transformer" / "weights.bin").read_bytes() == b"y"
    assert (back / "model" / "training.json").read_text() == '{"runs": ["gpu"]}'  # the packed record, not the export's
    # Adam's moments travel in bf16 and come back as float32 within bf16 rounding; the step counter is exact
    resumed = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    resumed.load_state_dict(ck["opt"])
    for p in lin.parameters():
        a, b = opt.state[p], resumed.state[p]
        assert b["exp_avg"].dtype == torch.float32 and torch.equal(a["step"], b["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert not torch.equal(a[k], b[k]) or a[k].abs().max() == 0
            torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=0.0)
    (tmp_path / "out" / "m.tar.01").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        unpack("m", tmp_path / "out", tmp_path / "again")


def test_render_chunks_in_spawned_processes_match_in_process():
    from mmeff.zoo.train_common import render_chunks
    from mmeff.zoo.train_sd3 import world_images

    seeds = list(range(7))
    one = list(render_chunks(world_images, seeds, 3, 0))
    two = list(render_chunks(world_images, seeds, 3, 2))
    assert [p for _, ps in two for p in ps] == [p for _, ps in one for p in ps]
    assert all((a == b).all() for (a, _), (b, _) in zip(one, two)) and len(two) == 3


def test_a_stage_warms_up_and_decays_from_its_own_start():
    from mmeff.zoo.train_common import stage_lr

    stage = {"step": 1000, "seconds": 600.0}
    assert stage_lr(1e-3, 1000, 600.0, 700.0, 100, True, stage) == pytest.approx(1e-5)  # warm-up restarts
    assert stage_lr(1e-3, 1099, 600.0, 700.0, 100, True, stage) == pytest.approx(1e-3)
    assert stage_lr(1e-3, 5000, 650.0, 700.0, 100, True, stage) == pytest.approx(0.55e-3)  # half-way: mid cosine
    assert stage_lr(1e-3, 5000, 700.0, 700.0, 100, True, stage) == pytest.approx(1e-4)  # 10% at the budget
    assert stage_lr(1e-3, 5000, 650.0, 700.0, 100, False, stage) == pytest.approx(1e-3)
    assert stage_lr(1e-3, 0, 0.0, 700.0, 100, True) == pytest.approx(1e-5)  # no stage: from zero (old checkpoints)


def test_a_passed_deadline_still_checkpoints_and_exports(tmp_path):
    """What lets a GPU call end on time: past its deadline a trainer stops, checkpoints and exports at once."""
    from mmeff.zoo.train_sd3 import MODELS_DIR, train

    info = train(1000.0, batch=2, ckpt_dir=tmp_path / "ck", out_dir=tmp_path / "out",
                 init_from=MODELS_DIR / "tiny-sd3", deadline=time.time())
    assert info["diffusion"]["steps"] == shipped_diffusion_steps("tiny-sd3") and (tmp_path / "ck" / "ckpt.pt").is_file()
    assert (tmp_path / "out" / "model_index.json").is_file()
