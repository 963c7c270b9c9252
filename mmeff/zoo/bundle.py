"""Carry a trainer's checkpoint off a machine in a few small files, and back.

A GPU lease returns at most 8 files of at most 16 MiB each and 64 MiB in all
(``/work/.library/device/README.md``), so :func:`pack` writes one tar holding only what cannot be re-made:

- ``ckpt/ckpt.pt``: the training checkpoint, slimmed by :func:`slim_checkpoint` (no latent pool, which the
  trainer regrows; no VAE optimiser once the VAE is frozen; Adam moments in bfloat16, which the optimiser casts
  back to float32 when it loads them);
- ``model/training.json``: the run's record as the exporting trainer wrote it.

The exported weights are not packed: they are the checkpoint's EMA weights, so :func:`unpack` re-exports them
with the trainer (``export``) and puts the packed ``training.json`` back. The tar is split into
``<name>.tar.00``, ``.01``, ... of :data:`PART_BYTES`. Afterwards ``train_sd3`` / ``train_wan`` resume with
``--ckpt-dir <dest>/<name>/ckpt`` or continue with ``--init-from <dest>/<name>/model``.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PART_BYTES = 15 * 1024 * 1024
"""Bytes per part: under the lease's 16 MiB per returned file."""

MOMENTS_DTYPE = torch.bfloat16
"""What Adam's moments travel as: half the bytes; resuming from them is exact up to bf16 rounding of the moments."""


def halve_moments(opt_state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser ``state_dict`` with its floating per-parameter tensors (Adam's moments) in :data:`MOMENTS_DTYPE`;
    ``step`` counters are left as they are. ``torch.optim`` casts them back to each parameter's dtype on load."""
    state = {
        idx: {k: (v.to(MOMENTS_DTYPE) if k != "step" and torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in per_param.items()}
        for idx, per_param in opt_state.get("state", {}).items()}
    return {**opt_state, "state": state}


def slim_checkpoint(src: Path) -> bytes:
    """The checkpoint at ``src`` as bytes, without the VAE optimiser once training is past the VAE phase and with
    every optimiser's moments in bfloat16 (recorded under ``"bundle"``)."""
    ck = torch.load(src, map_location="cpu", weights_only=False)
    dropped = ck.get("state", {}).get("phase") == 1 and ck.get("opt_vae") is not None
    if dropped:
        ck["opt_vae"] = None
    for key in ("opt", "opt_vae"):
        if ck.get(key):
            ck[key] = halve_moments(ck[key])
    ck["bundle"] = {"opt_vae_dropped": dropped, "moments_dtype": str(MOMENTS_DTYPE)}
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


def pack(name: str, ckpt_dir: Path, model_dir: Path, out: Path, part_bytes: int = PART_BYTES) -> list[dict[str, Any]]:
    """Write ``out/<name>.tar.NN`` parts holding ``ckpt/ckpt.pt`` (slimmed) and ``model/training.json``; return
    ``[{file, bytes, sha256}]``. Old parts of ``name`` are removed first, so a re-pack never mixes two runs."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.tar.*"):
        old.unlink()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ckpt = ckpt_dir / "ckpt.pt"
        if ckpt.is_file():
            data = slim_checkpoint(ckpt)
            info = tarfile.TarInfo("ckpt/ckpt.pt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if (model_dir / "training.json").is_file():
            tar.add(model_dir / "training.json", arcname="model/training.json")
    blob = buf.getvalue()
    parts = []
    for i in range(0, max(1, len(blob)), part_bytes):
        path = out / f"{name}.tar.{i // part_bytes:02d}"
        chunk = blob[i:i + part_bytes]
        path.write_bytes(chunk)
        parts.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def unpack(name: str, src: Path, dest: Path, export: Callable[[Path, Path], Any] | None = None) -> Path:
    """Join ``src/<name>.tar.NN`` and extract to ``dest/<name>/``; return that folder. With ``export`` (called as
    ``export(ckpt_dir, model_dir)``, e.g. a trainer's export-only run) the pipeline is re-made in ``model/`` from
    the checkpoint and the packed ``training.json`` is put back over the one the re-export wrote."""
    parts = sorted(src.glob(f"{name}.tar.[0-9][0-9]"))
    if not parts:
        raise FileNotFoundError(f"no {name}.tar.00 in {src}; pass the folder the GPU run's files came back to")
    indices = [int(p.suffix[1:]) for p in parts]
    if indices != list(range(len(parts))):
        raise FileNotFoundError(f"{src}: parts of {name} are missing (have {[p.name for p in parts]})")
    blob = b"".join(p.read_bytes() for p in parts)
    target = dest / name
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(target, filter="data")
    if export is not None:
        meta = target / "model" / "training.json"
        packed_meta = meta.read_bytes() if meta.is_file() else None
        export(target / "ckpt", target / "model")
        if packed_meta is not None:
            meta.write_bytes(packed_meta)
    return target
