"""Baseline vs method on the shipped diffusion pipelines, for the demo's guidance and video tabs.

- :func:`guidance_pair`: tiny-sd3 with CFG alone and with a guidance method added (SoftPAG by default,
  on the heads HeadHunter found for tiny-sd3, see ``docs/results/guidance-tiny-sd3.json``);
- :func:`video_pair`: tiny-wan dense and with a sparse attention method, the same prompt, seed and steps,
  scored with PSNR / SSIM against the dense video (:mod:`mmeff.eval.video_fidelity`).

Both remove the method before returning, so the cached pipeline stays as it was loaded.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..zoo.load_video import TINY_WAN_CFG
from .timing import TIMING_REPEATS, warm_median

DEFAULT_GUIDANCE = "softpag:heads=1.1;1.4;2.2;1.0,u=1,scale=3"
DEFAULT_VIDEO = "rectified_spaattn:drop=0.5,tau=0,block=4,preset=none,warmup_steps=1,first_frame_dense=false"
"""The ``fine`` layout of :mod:`mmeff.eval.video_fidelity` at drop 0.5: on tiny-wan's 256-token grid the drop at
which sparse videos stay about as close to dense as another seed's (31 dB on 8 test prompts); at drop 0.75 the
demo's prompts come out smeared (16-20 dB), so that setting is a menu choice, not the default."""
FINE_VIDEO_075 = "rectified_spaattn:drop=0.75,tau=0,block=4,preset=none,warmup_steps=1,first_frame_dense=false"
COARSE_VIDEO_075 = "rectified_spaattn:drop=0.75,tau=0.2,block=16,preset=none,warmup_steps=2,dense_layers=0"
DEFAULT_VMOBA = "vmoba:preset=tiny-wan,warmup_steps=2"
VIDEO_CHOICES = (DEFAULT_VIDEO, FINE_VIDEO_075, COARSE_VIDEO_075, DEFAULT_VMOBA)
"""The video tab's menu; any other spec can be typed in."""


def for_tiny_wan(spec: str) -> str:
    """``spec`` with tiny-wan's VMoBA preset added where it names neither a preset nor chunk shapes, so that
    ``vmoba`` or ``vmoba:topk=1`` run on the demo's model (the published presets are for 480p-720p grids)."""
    name, _, rest = spec.strip().partition(":")
    if name.strip() != "vmoba" or "preset=" in rest or "_chunk=" in rest:
        return spec
    return "vmoba:preset=tiny-wan" + (f",{rest}" if rest else "")


@functools.lru_cache(maxsize=2)
def load_diffusion(name: str) -> Any:
    """A shipped pipeline (``tiny-sd3`` or ``tiny-wan``) or a local folder, loaded once."""
    if name == "tiny-wan":
        from ..zoo.load_video import load_video_pipeline

        return load_video_pipeline(name)
    from ..zoo.load_pipeline import load_pipeline

    return load_pipeline(name)


def _to_image(array: np.ndarray, size: int) -> Image.Image:
    img = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype("uint8"))
    return img.resize((size, size), Image.NEAREST)


@dataclasses.dataclass
class GuidancePair:
    baseline: Image.Image
    guided: Image.Image
    baseline_seconds: float
    guided_seconds: float
    method: str


def guidance_pair(pipe: Any, prompt: str, seed: int, method: str = DEFAULT_GUIDANCE, *, steps: int = 10,
                  cfg: float = 4.0, call: dict[str, Any] | None = None, display: int = 256,
                  repeats: int = TIMING_REPEATS) -> GuidancePair:
    """Two images of ``prompt`` from one seed: CFG only, then CFG plus ``method`` (a guidance spec).
    Seconds are warm: one warm-up run, then the median of ``repeats``."""
    import mmeff

    from ..zoo.load_pipeline import TINY_SD3_CALL

    kwargs = {**(TINY_SD3_CALL if call is None else call), "num_inference_steps": steps, "guidance_scale": cfg,
              "output_type": "np"}

    def once() -> np.ndarray:
        with torch.inference_mode():
            return pipe(prompt=prompt, generator=torch.Generator().manual_seed(int(seed)), **kwargs).images[0]

    base, t_base = warm_median(once, repeats)
    with mmeff.apply(pipe, method):
        guided, t_guided = warm_median(once, repeats)
    return GuidancePair(_to_image(base, display), _to_image(guided, display), t_base, t_guided, method)


@dataclasses.dataclass
class VideoPair:
    dense_frames: list[Image.Image]
    sparse_frames: list[Image.Image]
    psnr_db: float
    ssim: float
    dense_seconds: float
    sparse_seconds: float
    report: dict[str, Any]
    method: str


def video_pair(pipe: Any, prompt: str, seed: int, method: str = DEFAULT_VIDEO, *, steps: int = 10,
               cfg: float = TINY_WAN_CFG, call: dict[str, Any] | None = None, frames: int = 4, display: int = 128,
               repeats: int = TIMING_REPEATS) -> VideoPair:
    """Dense and sparse videos of ``prompt`` from one seed, ``frames`` evenly spaced frames of each, and fidelity.
    Seconds are warm: one warm-up run, then the median of ``repeats``."""
    import mmeff

    from ..eval.video_fidelity import generate, psnr, ssim
    from ..zoo.load_video import TINY_WAN_CALL

    call = dict(TINY_WAN_CALL if call is None else call)
    def once() -> torch.Tensor:
        return generate(pipe, prompt, int(seed), steps=steps, cfg=cfg, call=call)[0]

    dense, t_dense = warm_median(once, repeats)
    with mmeff.apply(pipe, method) as handle:
        sparse, t_sparse = warm_median(once, repeats)
        report = handle.report()
    picks = np.linspace(0, dense.shape[0] - 1, num=min(frames, dense.shape[0])).round().astype(int)

    def strip(video: torch.Tensor) -> list[Image.Image]:
        return [_to_image(video[i].permute(1, 2, 0).numpy(), display) for i in picks]

    return VideoPair(strip(dense), strip(sparse), float(psnr(sparse, dense)), float(ssim(sparse, dense)),
                     t_dense, t_sparse, report, method)
