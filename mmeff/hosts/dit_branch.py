"""The perturbed guidance branch as extra batch rows of the stock pipeline's own transformer call.

Pre-forward: the cond rows of every batch-major input are copied and appended (``extend``), so one transformer
call computes [rows..., perturbed cond copies]; attention ops see the copies as ``ctx.perturbed`` rows.
Post-forward: the copies are split off and the correction ``w * (eps_cond - eps_pert)`` is added to *every*
original row (``fold``). Stock pipelines combine predictions affinely with weights that sum to one
(CFG: ``(1 - s) * eps_u + s * eps_c``; SD3 skip-layer guidance likewise), so an offset added to all of a
step's predictions passes through unchanged: the pipeline yields
``eps_u + s * (eps_c - eps_u) + w * (eps_c - eps_pert)`` without mmeff knowing ``s``, and ``eps_c + w * Δ``
when CFG is off. Sequential-CFG pipelines get the same offset on the step's uncond (partner) call.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class Branch:
    """One transformer call's perturbed branch: original batch size and the cond rows that were copied."""

    batch: int
    cond_rows: torch.Tensor   # long indices into the original batch
    weight: float
    cfg_batched: bool

    @property
    def rows(self) -> slice:
        return slice(self.batch, self.batch + int(self.cond_rows.numel()))

    @property
    def total(self) -> int:
        return self.batch + int(self.cond_rows.numel())


def _map_batch(value: Any, batch: int, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_map_batch(v, batch, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_batch(v, batch, fn) for k, v in value.items()}
    return value


def extend(kwargs: dict[str, Any], keys: tuple[str, ...], batch: int, rows: torch.Tensor) -> dict[str, Any]:
    """Append copies of ``rows`` to every batch-major input named in ``keys``."""
    out = dict(kwargs)
    for key in keys:
        if out.get(key) is not None:
            out[key] = _map_batch(out[key], batch, lambda t: torch.cat([t, t.index_select(0, rows.to(t.device))], 0))
    return out


def cfg_is_batched(pipe: Any, kwargs: dict[str, Any], batch: int) -> bool:
    """Whether a batched-CFG pipeline's call holds [uncond, cond] halves.

    The pipeline's ``do_classifier_free_guidance`` flag is used when it has one (SD3); otherwise (PixArt,
    CogVideoX keep it local) the call is CFG-batched iff the latent and timestep halves are identical, which is
    how those pipelines build the batch (``torch.cat([latents] * 2)``).
    """
    flag = getattr(type(pipe), "do_classifier_free_guidance", None) if pipe is not None else None
    if isinstance(flag, property):
        try:
            return bool(pipe.do_classifier_free_guidance) and batch % 2 == 0
        except AttributeError:
            pass
    if batch % 2:
        return False
    half = batch // 2
    x = kwargs["hidden_states"]
    if not torch.equal(x[:half], x[half:]):
        return False
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
        return bool(torch.equal(t[:half], t[half:]))
    return True


def split(output: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = sample_of(output)
    return sample[:batch], sample[batch:]


def sample_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output.sample = sample
    return output


def offset_for(branch: Branch, main: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
    """``w * (eps_cond - eps_pert)`` broadcast to every original row (uncond rows get their cond's offset)."""
    cond = main.index_select(0, branch.cond_rows.to(main.device))
    delta = (cond.float() - pert.float()) * branch.weight
    if branch.cfg_batched:
        delta = torch.cat([delta, delta], 0)
    return delta


def fold(output: Any, branch: Branch) -> tuple[Any, torch.Tensor]:
    """Drop the perturbed rows from ``output`` and add the guidance offset to all rows; returns (output, offset)."""
    main, pert = split(output, branch.batch)
    offset = offset_for(branch, main, pert)
    return with_sample(output, (main.float() + offset).to(main.dtype)), offset


def add_offset(output: Any, offset: torch.Tensor) -> Any:
    sample = sample_of(output)
    if sample.shape != offset.shape:
        return output
    return with_sample(output, (sample.float() + offset).to(sample.dtype))
