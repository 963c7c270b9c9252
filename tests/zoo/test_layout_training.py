"""Training the diffusion test bed on layout prompts: tiny-sd3's ``layout64`` recipe continues a ``64px`` model
with new text encoders, the VAE decoder fine-tune keeps the latent space, tiny-wan trains on layout videos."""
from __future__ import annotations

import json

import pytest
import torch

from mmeff.zoo.load_video import video_pipeline_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3_64px(tmp_path_factory):
    """A 64px tiny-sd3 trained for a few steps (stands in for the parent of a layout model)."""
    from mmeff.zoo.train_sd3 import train

    root = tmp_path_factory.mktemp("sd3_64px")
    info = train(0.02, vae_minutes=0.005, batch=2, ckpt_dir=root / "ckpt", out_dir=root / "out", recipe="64px",
                 log_every=1)
    return root / "out", info


def test_layout_recipe_keeps_the_parents_vae_and_transformer_but_not_its_text_encoders(sd3_64px, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmeff.zoo.train_sd3 import build_pipeline, load_saved, train

    parent, parent_info = sd3_64px
    saved = StableDiffusion3Pipeline.from_pretrained(parent)
    pipe = build_pipeline(recipe="layout64")
    state = load_saved(pipe, parent, "layout64")
    for a, b in zip(pipe.transformer.state_dict().values(), saved.transformer.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(pipe.vae.state_dict().values(), saved.vae.state_dict().values()):
        assert torch.equal(a, b)
    # the layout words are new tokens: the text encoders are rebuilt, not copied
    assert pipe.text_encoder.config.vocab_size != saved.text_encoder.config.vocab_size
    assert state["lineage"][-1]["recipe"] == "64px" and state["lineage"][-1]["kept"] == ["vae", "transformer"]

    spent = parent_info["vae"]["minutes"] + parent_info["diffusion"]["minutes"]
    info = train(spent + 0.02, batch=2, out_dir=tmp_path / "out", ckpt_dir=tmp_path / "ckpt", init_from=parent,
                 recipe="layout64", log_every=1)
    assert info["recipe"] == "layout64" and info["prompt_family"] == "layout"
    assert info["diffusion"]["steps"] > parent_info["diffusion"]["steps"]
    assert info["lineage"][-1]["diffusion_steps"] == parent_info["diffusion"]["steps"]
    from mmeff.zoo.prompt_family import folder_family

    assert folder_family(tmp_path / "out") == "layout" and folder_family(parent) == "world"
    # a same-recipe continuation copies the text encoders too
    again = build_pipeline(recipe="64px")
    load_saved(again, parent)
    for a, b in zip(again.text_encoder.state_dict().values(), saved.text_encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_decoder_finetune_trains_only_the_decoder_and_resumes(sd3_64px, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmeff.zoo.decoder_ft import finetune

    parent, _ = sd3_64px
    before = StableDiffusion3Pipeline.from_pretrained(parent).vae
    rec = finetune(parent, tmp_path / "ft", 0.01, ckpt_dir=tmp_path / "ck", data="layout", batch=2, log_every=1)
    assert rec["steps"] > 0 and rec["data"] == "layout"
    after = StableDiffusion3Pipeline.from_pretrained(tmp_path / "ft").vae
    for (name, a), b in zip(before.encoder.state_dict().items(), after.encoder.state_dict().values()):
        assert torch.equal(a, b), name  # the latent space is kept
    assert any(not torch.equal(a, b) for a, b in zip(before.decoder.state_dict().values(),
                                                      after.decoder.state_dict().values()))
    meta = json.loads((tmp_path / "ft" / "training.json").read_text())
    assert meta["decoder_finetune"]["steps"] == rec["steps"] and meta["diffusion"] == json.loads(
        (parent / "training.json").read_text())["diffusion"]
    # the budget is spent: a rerun resumes the checkpoint, trains nothing and writes the same decoder
    again = finetune(parent, tmp_path / "ft2", 0.01, ckpt_dir=tmp_path / "ck", data="layout", batch=2)
    assert again["steps"] == rec["steps"]
    dec2 = StableDiffusion3Pipeline.from_pretrained(tmp_path / "ft2").vae.decoder
    for a, b in zip(after.decoder.state_dict().values(), dec2.state_dict().values()):
        assert torch.equal(a, b)


def test_wan_layout_videos_and_tokenizer():
    from mmeff.zoo.train_wan import tokenizer, world_video_arrays

    arr, prompts = world_video_arrays([3, 4], frames=5, data="layout")
    assert arr.shape == (2, 5, 64, 64, 3) and all("moving" in p for p in prompts)
    assert not (arr[:, 0] == arr[:, -1]).all()  # the objects move
    world, layout = tokenizer("world"), tokenizer("layout")
    assert len(layout) > len(world)
    text = "a small red star and a blue circle on a white background"
    assert world(text).input_ids == layout(text).input_ids  # world words keep their ids
    assert len(layout("at the top left moving down").input_ids) == 7  # one token a word, plus </s>


def test_wan_continues_a_model_of_the_other_prompt_family_with_a_fresh_text_encoder():
    from diffusers import WanPipeline

    from mmeff.zoo.train_wan import build_pipeline, load_saved, saved_arch

    folder = video_pipeline_path("tiny-wan")
    meta = json.loads((folder / "training.json").read_text())
    shipped_family = meta.get("prompt_family", "world")
    other = "world" if shipped_family == "layout" else "layout"
    pipe = build_pipeline(data=other, **saved_arch(None, folder))
    state = load_saved(pipe, folder, vae_minutes=meta["vae"]["minutes"], data=other)
    saved = WanPipeline.from_pretrained(folder)
    for a, b in zip(pipe.transformer.state_dict().values(), saved.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.text_encoder.config.vocab_size != saved.text_encoder.config.vocab_size
    assert state["stages"][-1]["name"] == f"{shipped_family} prompts"
    assert state["stages"][-1]["kept"] == ["vae", "transformer"]


def test_an_explicit_wan_vae_clip_length_wins_over_the_saved_models(tmp_path):
    """Continuing a saved model with ``vae_frames`` set trains its VAE on clips of that length (the GPU plan's
    13-frame clips were silently replaced by the saved model's 5 before); unset, the saved length is kept."""
    from mmeff.zoo.train_wan import train

    kw = {"batch": 1, "vae_batch": 1, "vae_crop": 16, "log_every": 1, "data": "layout", "pool_size": 2, "max_steps": 0}
    first = train(0.004, vae_minutes=0.002, vae_frames=5, ckpt_dir=tmp_path / "ck0", out_dir=tmp_path / "m0", **kw)
    assert first["vae"]["clip_frames"] == 5 and first["prompt_family"] == "layout"
    vae_min = first["vae"]["minutes"]
    again = train(1.0, vae_minutes=vae_min + 0.002, vae_frames=9, init_from=tmp_path / "m0",
                  ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m1", **kw)
    assert again["vae"]["clip_frames"] == 9 and again["vae"]["steps"] > first["vae"]["steps"]
    assert again["recipe_config"]["vae_crop"] == 16 and again["recipe_config"]["vae_frames"] == 9
    kept = train(1.0, vae_minutes=vae_min + 0.002, init_from=tmp_path / "m0", ckpt_dir=tmp_path / "ck2",
                 out_dir=tmp_path / "m2", **kw)
    assert kept["vae"]["clip_frames"] == 5


def test_wan_still_images_are_the_videos_first_frames_with_still_prompts():
    from mmeff.zoo.train_wan import still_image_arrays, world_video_arrays
    from mmeff.zoo.world.layout import generate_layout_scene, make_layout_prompt

    images, prompts = still_image_arrays([3, 4], data="layout")
    videos, video_prompts = world_video_arrays([3, 4], frames=5, data="layout")
    assert images.shape == (2, 1, 64, 64, 3)
    assert (images[:, 0] == videos[:, 0]).all()
    assert prompts == [make_layout_prompt(generate_layout_scene(s)) for s in (3, 4)]
    assert not any("moving" in p for p in prompts) and all("moving" in p for p in video_prompts)


def test_wan_joint_image_video_training_trains_the_first_frame_path_and_alternates_steps(tmp_path):
    """``image_batch`` makes every other diffusion step a one-frame one, from its own latent pool of still-image
    prompts, counted apart in ``training.json``; ``vae_image_batch`` is recorded in the recipe."""
    from mmeff.zoo.train_wan import train

    kw = {"batch": 1, "vae_batch": 1, "vae_crop": 16, "vae_frames": 5, "log_every": 1, "data": "layout",
          "pool_size": 4, "ckpt_every": 0.0}
    info = train(1.0, vae_minutes=0.002, vae_image_batch=2, image_batch=3, max_steps=4,
                 ckpt_dir=tmp_path / "ck", out_dir=tmp_path / "out", **kw)
    assert info["recipe_config"]["vae_image_batch"] == 2 and info["recipe_config"]["image_batch"] == 3
    assert info["diffusion"]["steps"] == 4 and info["diffusion"]["image_steps"] == 2
    assert info["diffusion"]["image_samples_seen"] == 6 and info["diffusion"]["video_samples_seen"] == 2
    pool = torch.load(tmp_path / "ck" / "image_latent_pool.pt", weights_only=False)
    assert pool["latents"].shape[1:] == (8, 1, 16, 16) and len(pool["prompts"]) >= 4
    assert not any("moving" in p for p in pool["prompts"])
    video_pool = torch.load(tmp_path / "ck" / "latent_pool.pt", weights_only=False)
    assert video_pool["latents"].shape[1:] == (8, 4, 16, 16)


def test_wan_decoder_finetune_keeps_the_encoder_and_weights_the_first_frame(tmp_path):
    from diffusers import WanPipeline

    from mmeff.zoo.decoder_ft import finetune, load_any, wan_adapter
    from mmeff.zoo.train_wan import train

    train(0.004, vae_minutes=0.002, batch=1, vae_batch=1, vae_crop=16, vae_frames=5, log_every=1, data="layout",
          pool_size=2, max_steps=1, ckpt_dir=tmp_path / "ck", out_dir=tmp_path / "wan")
    before = WanPipeline.from_pretrained(tmp_path / "wan").vae
    rec = finetune(tmp_path / "wan", tmp_path / "ft", 0.01, ckpt_dir=tmp_path / "dck", batch=1, crop=16,
                   first_frame_weight=4.0, log_every=1)
    assert rec["steps"] > 0 and rec["data"] == "layout" and rec["first_frame_weight"] == 4.0
    after, kind = load_any(tmp_path / "ft")
    assert kind == "wan"
    for a, b in zip(before.encoder.state_dict().values(), after.vae.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before.decoder.state_dict().values(),
                                                      after.vae.decoder.state_dict().values()))
    ad = wan_adapter(after, "layout", 16, 4.0)
    x = ad.batch(0, 1)
    w = ad.frame_weights(x)
    assert x.shape == (1, 3, 13, 16, 16) and float(w.mean()) == pytest.approx(1.0)
    assert float(w[0, 0, 0]) == pytest.approx(4 * float(w[0, 0, 1]))


def test_decoder_finetune_refuses_a_folder_that_is_no_zoo_pipeline(tmp_path):
    from mmeff.core.errors import ConfigError
    from mmeff.zoo.decoder_ft import finetune

    with pytest.raises(ConfigError, match="not a saved zoo pipeline"):
        finetune(tmp_path, tmp_path / "out", 0.01, ckpt_dir=tmp_path / "ck")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()  # nothing half-done


def test_wan_grows_a_saved_transformer_seeds_its_pools_and_resumes_at_the_grown_size(tmp_path):
    """``grow_to`` continues a saved model with a deeper, wider transformer (recorded as a stage), ``pool_from``
    reuses the saved run's latent pools, and a resumed checkpoint rebuilds the grown size (growing it again
    while resuming is refused)."""
    from diffusers import WanTransformer3DModel

    from mmeff.zoo.train_wan import train

    kw = {"batch": 1, "vae_batch": 1, "vae_crop": 16, "vae_frames": 5, "log_every": 1, "data": "layout",
          "pool_size": 2, "image_batch": 1, "ckpt_every": 0.0}
    first = train(1.0, vae_minutes=0.002, max_steps=2, ckpt_dir=tmp_path / "ck0", out_dir=tmp_path / "m0", **kw)
    steps = first["diffusion"]["steps"]
    grown = train(5.0, vae_minutes=0.0, init_from=tmp_path / "m0", grow_to=(6, 384), pool_from=tmp_path / "ck0",
                  max_steps=steps + 2, ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m1", **kw)
    tr = WanTransformer3DModel.from_pretrained(tmp_path / "m1" / "transformer")
    assert (tr.config.num_layers, tr.config.ffn_dim) == (6, 384)
    assert grown["stages"][-1]["name"] == "transformer grown" and grown["stages"][-1]["to"]["num_layers"] == 6
    assert grown["params"]["transformer"] > 1.5 * first["params"]["transformer"]
    assert grown["diffusion"]["steps"] == steps + 2
    # the joint image-video counts go on from the saved model's (one image step each side)
    assert first["diffusion"]["image_steps"] == 1 and grown["diffusion"]["image_steps"] == 2
    assert grown["diffusion"]["image_samples_seen"] == 2 and grown["diffusion"]["video_samples_seen"] == 2
    for name in ("latent_pool.pt", "image_latent_pool.pt"):  # seeded full (to the pool size), so never regrown
        a = torch.load(tmp_path / "ck0" / name, weights_only=False)
        b = torch.load(tmp_path / "ck1" / name, weights_only=False)
        assert len(b["prompts"]) == 2 and torch.equal(a["latents"][:2], b["latents"]) and a["prompts"][:2] == b["prompts"]
    resumed = train(5.0, max_steps=steps + 3, ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m2", **kw)
    assert resumed["diffusion"]["steps"] == steps + 3 and resumed["params"] == grown["params"]
    with pytest.raises(SystemExit, match="no latent_pool.pt there"):
        train(5.0, init_from=tmp_path / "m0", pool_from=tmp_path / "m0", ckpt_dir=tmp_path / "ck4",
              out_dir=tmp_path / "m4", **kw)
    with pytest.raises(SystemExit, match="cannot be grown while resuming"):
        train(5.0, grow_to=(8, 512), ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m3", **kw)


def test_wan_widens_a_saved_transformer_and_resumes_at_the_wide_size(tmp_path):
    """``heads`` (twice the saved model's) continues a saved model with a widened transformer, after growing it
    when both are asked, recorded as stages; a resumed checkpoint rebuilds the wide size; other head counts and
    widening while resuming are refused before anything is written."""
    from diffusers import WanTransformer3DModel

    from mmeff.zoo.train_wan import train

    kw = {"batch": 1, "vae_batch": 1, "vae_crop": 16, "vae_frames": 5, "log_every": 1, "data": "layout",
          "pool_size": 2, "image_batch": 1, "ckpt_every": 0.0}
    first = train(1.0, vae_minutes=0.002, max_steps=2, ckpt_dir=tmp_path / "ck0", out_dir=tmp_path / "m0", **kw)
    steps = first["diffusion"]["steps"]
    wide = train(5.0, vae_minutes=0.0, init_from=tmp_path / "m0", grow_to=(5, 256), heads=8,
                 pool_from=tmp_path / "ck0", max_steps=steps + 1, ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m1",
                 **kw)
    tr = WanTransformer3DModel.from_pretrained(tmp_path / "m1" / "transformer")
    assert (tr.config.num_layers, tr.config.num_attention_heads, tr.config.attention_head_dim) == (5, 8, 16)
    assert [s["name"] for s in wide["stages"][-2:]] == ["transformer grown", "transformer widened"]
    assert wide["stages"][-1]["from"]["num_attention_heads"] == 4 and wide["stages"][-1]["to"]["num_attention_heads"] == 8
    assert wide["params"]["transformer"] > 2.5 * first["params"]["transformer"]
    resumed = train(5.0, heads=8, max_steps=steps + 2, ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m2", **kw)
    assert resumed["diffusion"]["steps"] == steps + 2 and resumed["params"] == wide["params"]
    with pytest.raises(SystemExit, match="cannot be widened while resuming"):
        train(5.0, heads=16, ckpt_dir=tmp_path / "ck1", out_dir=tmp_path / "m3", **kw)
    with pytest.raises(SystemExit, match="widening doubles the heads, so give 8"):
        train(5.0, init_from=tmp_path / "m0", heads=12, ckpt_dir=tmp_path / "ck4", out_dir=tmp_path / "m4", **kw)
    assert not (tmp_path / "ck4").exists() and not (tmp_path / "m4").exists()
