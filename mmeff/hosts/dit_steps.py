"""Which denoising step a transformer call belongs to, seen from the transformer alone.

A pipeline's ``__call__`` cannot be hooked per instance, so steps are derived from the transformer's own
calls: the scalar timestep of each call (its max, so per-token timesteps work too) is compared with the
previous call's. A lower timestep starts the next step, an equal one stays in the step, and a higher one
means a new generation started, so the count resets to 0. The number of steps comes from the pipeline when
one is known (``pipe._num_timesteps``, set by every stock pipeline before its loop, else the length of
``pipe.scheduler.timesteps``).

Stock pipelines with sequential CFG (FLUX, Wan, HunyuanVideo) call the transformer twice per step on the
*same* latent tensor (cond, then uncond). A call is a *partner* of the previous one when it has the same
timestep and the very same ``hidden_states`` tensor object (unmodified since: same autograd version counter); guidance folds the
step's correction into partner outputs instead of running another perturbed branch. Under
``torch.inference_mode()`` tensors have no version counter, so there the object identity alone decides.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class CallInfo:
    step: int
    num_steps: int | None
    call_in_step: int
    partner: bool


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place version counter of ``t``; None for inference-mode tensors, which have none."""
    return None if t.is_inference() else t._version


def timestep_value(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.detach().float().max()) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class StepTracker:
    def __init__(self, pipe: Any | None) -> None:
        self.pipe = pipe
        self.step = -1
        self.call_in_step = 0
        self.last_t: float | None = None
        self._last_hidden: weakref.ref[torch.Tensor] | None = None
        self._last_version: int | None = -1
        self.calls = 0
        self.generations = 0

    def num_steps(self) -> int | None:
        if self.pipe is None:
            return None
        n = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(n, int) and n > 0:
            return n
        ts = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(ts) if ts is not None and len(ts) > 0 else None

    def on_call(self, timestep: Any, hidden: torch.Tensor) -> CallInfo:
        t = timestep_value(timestep)
        same_t = t is not None and self.last_t is not None and t == self.last_t
        if self.last_t is None or t is None or t > self.last_t:
            self.step, self.call_in_step = 0, 0
            self.generations += 1
        elif t < self.last_t:
            self.step, self.call_in_step = self.step + 1, 0
        else:
            self.call_in_step += 1
        prev = self._last_hidden() if self._last_hidden is not None else None
        version = tensor_version(hidden)
        partner = same_t and prev is hidden and version == self._last_version
        self.last_t = t
        self._last_hidden = weakref.ref(hidden)
        self._last_version = version
        self.calls += 1
        return CallInfo(self.step, self.num_steps(), self.call_in_step, partner)

    def reset(self) -> None:
        self.step, self.call_in_step, self.last_t, self._last_hidden = -1, 0, None, None
