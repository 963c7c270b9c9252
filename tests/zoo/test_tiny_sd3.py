"""The shipped tiny diffusion zoo: tiny-sd3 (real StableDiffusion3Pipeline) loads offline and generates images at
its training size, the tiny CLIP judge prefers a render's own caption (only asserted when its training.json says it was
trained), and guidance_eval writes its JSON and grid on a 2-prompt, 2-step run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmeff.zoo.judge import MODEL_DIR as JUDGE_DIR
from mmeff.zoo.load_pipeline import MODELS_DIR, TINY_SD3_CALL, load_pipeline
from mmeff.zoo.world import (
    generate_scene,
    make_caption,
    make_prompt,
    render,
    split_seeds,
)

from .conftest import load_offline

pytestmark = pytest.mark.usefixtures("one_thread")
SD3_DIR = MODELS_DIR / "tiny-sd3"


def test_tiny_models_ship_with_the_package():
    assert (SD3_DIR / "model_index.json").is_file()
    assert (JUDGE_DIR / "config.json").is_file()


@pytest.fixture(scope="module")
def sd3():
    return load_offline(load_pipeline, "tiny-sd3")


@pytest.fixture(scope="module")
def judge():
    return load_pipeline("tiny-clip-judge")


def test_tiny_sd3_loads_offline_and_generates(sd3):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(sd3, StableDiffusion3Pipeline)
    info = json.loads((SD3_DIR / "training.json").read_text())
    size = info["image_size"]
    assert TINY_SD3_CALL["height"] == TINY_SD3_CALL["width"] == size  # the call defaults match the shipped model
    assert sd3.vae_scale_factor * info["latent_shape"][1] == size
    out = sd3(prompt=make_prompt(generate_scene(1_100_000)), num_inference_steps=2, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(0), output_type="np", **TINY_SD3_CALL)
    assert out.images.shape == (1, size, size, 3)
    assert np.isfinite(out.images).all()
    assert info["format"] == "mmeff.zoo.tiny-sd3/1" and "diffusion" in info


def test_unknown_zoo_name_is_a_clear_error():
    from mmeff.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown zoo pipeline"):
        load_pipeline("tiny-nope")


def test_judge_prefers_own_caption(judge):
    info = json.loads((JUDGE_DIR / "training.json").read_text())
    if info.get("trained") is not True:  # the explicit marker written by train_judge
        pytest.skip("tiny-clip-judge's training.json does not say it was trained")
    scenes = [generate_scene(s) for s in split_seeds("test", 8)]
    images = [render(s, size=32) for s in scenes]
    own = judge.clip_score(images, [make_caption(s) for s in scenes])
    mism = judge.clip_score(images, [make_caption(s) for s in scenes[1:] + scenes[:1]])
    assert own[0] > mism[0]
    assert sum(o > m for o, m in zip(own, mism)) >= 6
    pres = judge.object_presence(images, scenes)
    assert all(0.0 <= p <= 1.0 for p in pres)


def test_guidance_eval_writes_json_and_grid(tmp_path):
    from PIL import Image

    from mmeff.eval.guidance_eval import METHODS, RUNS, run, table
    from mmeff.zoo.judge import Judge, build, default_config

    if (SD3_DIR / "model_index.json").is_file():
        pipe = load_pipeline("tiny-sd3")
    else:  # untrained stand-in with the same architecture
        from mmeff.zoo.train_sd3 import build_pipeline

        pipe = build_pipeline()
        for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            m.eval()
    j = Judge.load() if (JUDGE_DIR / "config.json").is_file() else Judge(build()[0], default_config())
    out = tmp_path / "g.json"
    rep = run(out, pipe=pipe, judge=j, n_test=2, steps=2, search_prompts=1, rounds=1, top_k=1,
              candidates=["0.0", "1.1"], batch_size=2, objective="clip+presence", softpag_mode="image_identity")
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(METHODS)
    assert data["results"]["cfg+pag"]["config"]["mode"] == "image_identity"  # diffusers' PAG rule
    assert data["results"]["cfg+pag-joint"]["config"]["mode"] == "joint_identity"  # same layer, not diffusers'
    # the searched heads are perturbed the way they are deployed (here diffusers' rule on single heads)
    assert data["results"]["cfg+softpag"]["config"]["mode"] == "image_identity" == data["search"]["mode"]
    assert data["results"]["cfg+pag"]["config"]["layers"] == data["results"]["cfg+pag-joint"]["config"]["layers"]
    for name in METHODS:  # every row says what it runs
        assert data["results"][name]["runs"] == data["config"]["runs"][name]
        assert data["results"][name]["runs"] == RUNS[name] or name == "cfg+softpag"
    assert "mode='image_identity'" in data["results"]["cfg+softpag"]["runs"]
    for r in data["results"].values():
        assert np.isfinite(r["clip_score"]) and 0.0 <= r["presence_acc"] <= 1.0 and r["sec_per_image"] > 0
        # the combined objective is clip / 100 + presence, per image, so also in the mean
        assert r["objective"] == pytest.approx(r["clip_score"] / 100 + r["presence_acc"], abs=1e-6)
    for name in ("cfg+pag", "cfg+pag-joint", "cfg+softpag"):  # paired differences against CFG, per metric
        vs = data["results"][name]["vs_cfg"]
        assert set(vs) == {"clip_score", "presence", "objective"}
        assert vs["clip_score"]["mean"] == pytest.approx(
            data["results"][name]["clip_score"] - data["results"]["cfg"]["clip_score"], abs=1e-6)
    assert data["search"]["objective"] == "judge.clip+presence" and np.isfinite(data["search"]["baseline_cfg_only"])
    assert data["found_heads"] in ("0.0", "1.1")
    assert {"torch", "diffusers", "transformers"} <= set(data["versions"])
    grid = Image.open(tmp_path / "g_grid.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] >= 4 * 128
    assert "cfg+softpag" in table(rep)


def test_training_continues_the_shipped_pipeline(tmp_path):
    """``--init-from`` starts from the saved weights and counters: a few more diffusion steps,
    the VAE and its latent statistics untouched, the report cumulative."""
    from mmeff.zoo.train_sd3 import build_pipeline, load_saved, saved_recipe, train

    before = json.loads((SD3_DIR / "training.json").read_text())
    recipe = saved_recipe(SD3_DIR)
    pipe = build_pipeline(recipe=recipe)
    state = load_saved(pipe, SD3_DIR)
    assert state["step"] == before["diffusion"]["steps"] and state["phase"] == 1
    shipped = load_offline(load_pipeline, "tiny-sd3")
    for a, b in zip(pipe.transformer.state_dict().values(), shipped.transformer.state_dict().values()):
        assert torch.equal(a, b)
    spent = before["vae"]["minutes"] + before["diffusion"]["minutes"]
    info = train(spent + 0.03, batch=2, out_dir=tmp_path / "out", ckpt_dir=tmp_path / "ckpt", init_from=SD3_DIR,
                 log_every=1)
    assert info["diffusion"]["steps"] > before["diffusion"]["steps"]
    assert info["vae"]["steps"] == before["vae"]["steps"]
    assert info["vae"]["scaling_factor"] == before["vae"]["scaling_factor"]
    with pytest.raises(FileNotFoundError, match="training.json"):
        load_saved(build_pipeline(recipe=recipe), tmp_path)


def test_the_vlm_objective_scores_what_an_image_shows_against_its_prompts_scene():
    from mmeff.core.errors import ConfigError
    from mmeff.eval.guidance_eval import run, vlm_objective
    from mmeff.zoo.load import load
    from mmeff.zoo.prompt_family import held_out_scenes, prompt_of
    from mmeff.zoo.world import render

    scenes = held_out_scenes("layout", "val", 6)
    prompts = [prompt_of("layout", s) for s in scenes]
    score = vlm_objective(load("tiny-qwen2-vl"), dict(zip(prompts, scenes)))
    renders = [np.asarray(render(s, size=64)) for s in scenes]
    right = score(renders, prompts)
    wrong = score(renders[1:] + renders[:1], prompts)  # each image scored against another scene
    assert len(right) == 6 and all(0.0 <= v <= 1.0 for v in right)
    assert np.mean(right) >= 0.85 and np.mean(right) > np.mean(wrong) + 0.1
    with pytest.raises(ConfigError, match="needs --vlm"):
        run("unused.json", pipe=load_pipeline("tiny-sd3"), judge=object(), objective="vlm", vlm=None)
