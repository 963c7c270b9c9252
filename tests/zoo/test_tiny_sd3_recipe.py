"""train_sd3's recipes: the 64 px architecture, the latent pool, EMA weights, VAE crops, resume and export."""
from __future__ import annotations

import json

import pytest
import torch

from mmeff.zoo.train_sd3 import (
    EMA,
    LatentPool,
    build_pipeline,
    object_mask,
    random_crops,
    recipe_of,
    train,
    world_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_64px_recipe_keeps_64_image_tokens_at_64px():
    pipe = build_pipeline(recipe="64px")
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.sample_size == 16
    with torch.no_grad():
        out = pipe(prompt="a small red star on a white background", num_inference_steps=1, height=64, width=64,
                   max_sequence_length=36, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_unknown_recipe_is_a_clear_error():
    from mmeff.core.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe"):
        recipe_of("16px")


def test_random_crops_are_windows_of_the_images_and_reproducible():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a, b = random_crops(x, 4, seed=5), random_crops(x, 4, seed=5)
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b)
    for im, crop in zip(x, a):
        y, c = [int(v) for v in ((im[0] == crop[0, 0, 0]).nonzero()[0])]
        assert torch.equal(im[:, y:y + 4, c:c + 4], crop)


def test_object_mask_marks_object_pixels_only():
    x, _ = world_batch([1_100_000, 1_100_001], 64)
    m = object_mask(x)
    assert m.shape == (2, 1, 64, 64) and 0.0 < float(m.mean()) < 0.3
    corner = x[:, :, :1, :1].expand_as(x)
    assert float(object_mask(corner.contiguous()).sum()) == 0.0  # a blank canvas has no object pixel


def test_latent_pool_grows_samples_and_round_trips(tmp_path):
    pool = LatentPool(4)
    pool.add(torch.randn(3, 4, 2, 2), ["a", "b", "c"])
    assert not pool.full
    pool.add(torch.randn(2, 4, 2, 2), ["d", "e"])
    assert pool.full and len(pool) == 5
    z, p = pool.sample(6, torch.Generator().manual_seed(0))
    assert z.shape == (6, 4, 2, 2) and z.dtype == torch.float32 and set(p) <= set("abcde")
    pool.save(tmp_path / "pool.pt")
    again = LatentPool(4)
    again.load(tmp_path / "pool.pt")
    assert again.prompts == pool.prompts and all(torch.equal(u, v) for u, v in zip(again.latents, pool.latents))


def test_ema_tracks_the_parameters_and_copies_back():
    lin = torch.nn.Linear(2, 2)
    ema = EMA({"m": lin}, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for n in range(40):
        ema.update({"m": lin}, n)
    assert torch.allclose(ema.shadow["m"]["weight"], torch.ones(2, 2), atol=1e-6)
    with torch.no_grad():
        lin.weight.zero_()
    ema.copy_to({"m": lin})
    assert torch.allclose(lin.weight, torch.ones(2, 2), atol=1e-6)


def test_64px_training_resumes_and_exports_ema_weights(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    info = train(0.02, vae_minutes=0.005, batch=2, ckpt_dir=ckpt, out_dir=out, recipe="64px", log_every=1)
    assert info["recipe"] == "64px" and info["image_size"] == 64 and info["latent_shape"] == [4, 16, 16]
    assert info["diffusion"]["steps"] > 0 and info["diffusion"]["weights"].startswith("EMA")
    assert (ckpt / "latent_pool.pt").is_file()
    ck = torch.load(ckpt / "ckpt.pt", weights_only=False)
    assert ck["recipe"] == "64px"
    saved = json.loads((out / "training.json").read_text())
    from diffusers import SD3Transformer2DModel

    tr = SD3Transformer2DModel.from_pretrained(out / "transformer")
    for name, p in tr.named_parameters():  # the saved transformer is the EMA, not the last step
        assert torch.equal(p, ck["ema"]["transformer"][name])
    assert any(not torch.equal(ck["transformer"][n], ck["ema"]["transformer"][n]) for n in ck["ema"]["transformer"])
    again = train(0.02, ckpt_dir=ckpt, out_dir=tmp_path / "export", export_only=True)  # recipe from the checkpoint
    assert again["diffusion"]["steps"] == saved["diffusion"]["steps"] and again["recipe"] == "64px"
