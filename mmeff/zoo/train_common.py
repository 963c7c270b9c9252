"""What the zoo's diffusion trainers (``train_sd3``, ``train_wan``) share: EMA weights, a cached latent pool,
the learning-rate schedule of a training *stage*, atomic checkpoints, a wall-clock deadline, mixed precision
and parallel rendering of training data.

A *stage* is one continuation of a model: a fresh run, an ``--init-from`` of a saved model, or the GPU run of
``mmeff.zoo.train_gpu``. Its warm-up and cosine decay start at the step and the seconds the stage began with,
so a continued model gets its own schedule (a fresh optimiser warms up again) while a resumed checkpoint carries
on the schedule it was in.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_ckpt(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file, so an interrupted write never leaves a broken checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def stage_lr(base: float, step: int, seconds: float, budget: float, warmup: int, cosine: bool,
             stage: dict[str, float] | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then (``cosine``) a cosine decay to 10% of ``base`` at ``budget``
    seconds, both counted from the ``stage`` start (``{"step": s0, "seconds": t0}``; none: from zero)."""
    s0, t0 = (stage or {}).get("step", 0), (stage or {}).get("seconds", 0.0)
    lr = base * min(1.0, (step - s0 + 1) / max(1, warmup))
    if cosine:
        frac = (seconds - t0) / max(budget - t0, 1e-9)
        lr *= 0.1 + 0.45 * (1.0 + float(np.cos(np.pi * min(1.0, max(0.0, frac)))))
    return lr


def samples_seen(st: dict[str, Any], batch: int) -> int:
    """Diffusion samples seen: those counted when the stage began (``samples_before``) plus each run since
    (``runs[runs_counted_from:]``, steps x that run's batch); steps no run recorded count at ``batch``."""
    runs = st.get("runs", [])[st.get("runs_counted_from", 0):]
    counted = sum(r["to_step"] - r["from_step"] for r in runs)
    before = st.get("samples_before")
    if before is None:
        before = (st["step"] - counted) * batch
    return int(before + sum((r["to_step"] - r["from_step"]) * r["batch"] for r in runs))


def random_crops(x: torch.Tensor, crop: int, seed: int) -> torch.Tensor:
    """One random ``crop`` x ``crop`` window of every item of ``x`` (images ``[B, C, H, W]`` or videos
    ``[B, C, T, H, W]``: the same window in every frame); reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - crop + 1, (x.shape[0],), generator=g).tolist()
    xs = torch.randint(0, w - crop + 1, (x.shape[0],), generator=g).tolist()
    return torch.stack([v[..., y:y + crop, c:c + crop] for v, y, c in zip(x, ys, xs)])


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` 1 where a pixel differs from its image's background (the median of the four corners)."""
    corners = torch.stack([x[:, :, 0, 0], x[:, :, 0, -1], x[:, :, -1, 0], x[:, :, -1, -1]], -1)
    bg = corners.median(-1).values[:, :, None, None]
    return ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()


class EMA:
    """Exponential moving average of parameters (decay warmed up as ``min(decay, (1+n)/(10+n))``)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = {k: {n: p.detach().clone() for n, p in m.named_parameters()} for k, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], n: int) -> None:
        d = min(self.decay, (1 + n) / (10 + n))
        for k, m in modules.items():
            names = [name for name, _ in m.named_parameters()]
            shadow = [self.shadow[k][name] for name in names]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [p.detach() for p in m.parameters()], alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for k, m in modules.items():
            for name, p in m.named_parameters():
                p.copy_(self.shadow[k][name])

    def load(self, shadow: dict[str, dict[str, torch.Tensor]], device: torch.device | str) -> None:
        """Take a saved shadow (e.g. a CPU checkpoint's) onto ``device``."""
        self.shadow = {k: {n: t.to(device) for n, t in v.items()} for k, v in shadow.items()}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The shadow on the CPU (what a checkpoint stores)."""
        return {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in self.shadow.items()}


class LatentPool:
    """Frozen-VAE latents (scaled, fp16) and prompts of the first ``size`` training samples: grown until full,
    then sampled at random. Saved beside the checkpoint."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.latents: list[torch.Tensor] = []
        self.prompts: list[str] = []
        self.dirty = False

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def full(self) -> bool:
        return len(self) >= self.size

    def add(self, z: torch.Tensor, prompts: list[str]) -> None:
        self.latents.extend(z.detach().to("cpu", torch.float16).unbind(0))
        self.prompts.extend(prompts)
        self.dirty = True

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(len(self), (batch,), generator=gen).tolist()
        return torch.stack([self.latents[i] for i in idx]).float(), [self.prompts[i] for i in idx]

    def save(self, path: Path) -> None:
        if self.dirty and len(self):
            save_ckpt(path, {"latents": torch.stack(self.latents), "prompts": self.prompts})
            self.dirty = False

    def load(self, path: Path) -> None:
        if path.exists():
            d = torch.load(path, map_location="cpu", weights_only=False)
            self.latents, self.prompts = list(d["latents"].unbind(0)), list(d["prompts"])


class Deadline:
    """A wall-clock time (``time.time()``) after which a trainer checkpoints, exports and returns."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.time()


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``amp`` (weights, optimiser and loss stay fp32); a no-op elsewhere."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/``None``: CUDA when available, else the CPU. A CUDA request without CUDA is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    return dev


def _call_chunk(args: tuple[Callable[[list[int]], Any], list[int]]) -> Any:
    fn, seeds = args
    return fn(seeds)


def render_chunks(fn: Callable[[list[int]], Any], seeds: Sequence[int], chunk: int, workers: int) -> Iterator[Any]:
    """``fn(seeds[i:i+chunk])`` for every chunk, in order; in ``workers`` spawned processes when > 1 (the
    world renders with numpy/PIL on the CPU, which is what a GPU machine's idle cores are for). Spawned workers
    re-import the main module, so the entry point must be ``if __name__ == "__main__"``-guarded (the trainers'
    and ``mmeff.zoo.train_gpu``'s are)."""
    parts = [list(seeds[i:i + chunk]) for i in range(0, len(seeds), chunk)]
    if workers <= 1 or len(parts) <= 1:
        for p in parts:
            yield fn(p)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_call_chunk, [(fn, p) for p in parts])
