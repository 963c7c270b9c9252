"""diffusers ships its own PAG: SoftPAG at the matching setting must reproduce it (the library oracle).

diffusers' StableDiffusion3PAGPipeline perturbs every head of the ``pag_applied_layers`` with identity attention
over the image tokens (text queries and keys keep their attention), i.e. SoftPAG with ``u=1``,
``mode="image_identity"`` on the same whole layers, and combines ``uncond + cfg (cond - uncond) +
pag_scale (cond - perturbed)``.
"""
from __future__ import annotations

import pytest
import torch

import mmeff
import mmeff.zoo.tiny_pipelines as tp
from mmeff.guidance import SoftPAG

from .conftest import generate


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("layer", [0, 1])
def test_softpag_image_identity_on_whole_layers_equals_diffusers_sd3_pag(cfg, layer):
    from diffusers import StableDiffusion3PAGPipeline

    pipe = tp.tiny_pipeline("sd3")
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    pag = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=[f"blocks.{layer}"])
    pag.set_progress_bar_config(disable=True)
    reference = generate(pag, "sd3", cfg=cfg, pag_scale=2.5, steps=3)
    dense = generate(pipe, "sd3", cfg=cfg, steps=3)
    with mmeff.apply(pipe, SoftPAG(layers=(layer,), u=1.0, scale=2.5, mode="image_identity")):
        ours = generate(pipe, "sd3", cfg=cfg, steps=3)
    assert (reference - dense).abs().max() > 1e-3  # PAG changes the image, so the comparison can fail
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=2e-5)


def test_joint_identity_is_not_diffusers_pag():
    """mmeff's default mode perturbs text rows too; it is a different method from diffusers' SD3 PAG."""
    from diffusers import StableDiffusion3PAGPipeline

    pipe = tp.tiny_pipeline("sd3")
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    pag = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=["blocks.1"])
    pag.set_progress_bar_config(disable=True)
    reference = generate(pag, "sd3", cfg=4.0, pag_scale=2.5, steps=3)
    with mmeff.apply(pipe, SoftPAG(layers=(1,), u=1.0, scale=2.5, mode="joint_identity")):
        ours = generate(pipe, "sd3", cfg=4.0, steps=3)
    assert (ours - reference).abs().max() > 1e-4


def test_image_identity_equals_diffusers_sd3_pag_on_the_zoo_pipeline():
    """The guidance comparison's ``cfg+pag`` row, checked on the model it runs on: the shipped tiny-sd3 at its
    own resolution, diffusers' default ``pag_applied_layers`` (``blocks.1``), whole layer (every head, u=1)."""
    from diffusers import StableDiffusion3PAGPipeline

    from mmeff.eval.guidance_eval import RUNS
    from mmeff.eval.t2i_fidelity import pipe_call_kwargs
    from mmeff.zoo.load_pipeline import load_pipeline

    pipe = load_pipeline("tiny-sd3")
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    pag = StableDiffusion3PAGPipeline(**parts)  # diffusers' default layer
    pag.set_progress_bar_config(disable=True)
    assert pag.pag_applied_layers == ["blocks.1"] and "blocks.1" in RUNS["cfg+pag"]
    kw = {**pipe_call_kwargs(pipe), "prompt": "a large red square and a small blue circle on a white background",
          "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "pt"}

    def run(p, **extra):
        with torch.no_grad():
            return p(**kw, **extra, generator=torch.Generator().manual_seed(7)).images

    reference = run(pag, pag_scale=3.0)
    dense = run(pipe)
    with mmeff.apply(pipe, SoftPAG(layers=(1,), u=1.0, scale=3.0, mode="image_identity")):
        ours = run(pipe)
    assert (reference - dense).abs().max() > 1e-3  # PAG changes the image, so the comparison can fail
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=2e-5)
    with mmeff.apply(pipe, SoftPAG(layers=(1,), u=1.0, scale=3.0, mode="joint_identity")):
        joint = run(pipe)
    assert (joint - reference).abs().max() > 1e-4  # the cfg+pag-joint row is a different method
