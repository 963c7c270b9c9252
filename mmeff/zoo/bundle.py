"""Carry a trainer's checkpoint and exported model off a machine in a few files, and back.

A GPU lease returns at most 8 files of at most 16 MiB each (``/work/.library/device/README.md``), so
:func:`pack` writes one tar of ``ckpt/ckpt.pt`` (the training checkpoint without its latent pool, which the
trainer regrows, and without the VAE optimiser once the VAE is frozen) and ``model/`` (the exported pipeline
with ``training.json``) as ``<name>.tar.00``, ``.01``, ... parts of :data:`PART_BYTES`. :func:`unpack` joins the
parts and extracts them, so ``train_sd3`` / ``train_wan`` resume with ``--ckpt-dir <dest>/<name>/ckpt`` or
continue with ``--init-from <dest>/<name>/model``.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import torch

PART_BYTES = 15 * 1024 * 1024
"""Bytes per part: under the lease's 16 MiB per returned file."""


def slim_checkpoint(src: Path) -> bytes:
    """The checkpoint at ``src`` as bytes, without the VAE optimiser once training is past the VAE phase."""
    ck = torch.load(src, map_location="cpu", weights_only=False)
    if ck.get("state", {}).get("phase") == 1:
        ck["opt_vae"] = None
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


def pack(name: str, ckpt_dir: Path, model_dir: Path, out: Path, part_bytes: int = PART_BYTES) -> list[dict[str, Any]]:
    """Write ``out/<name>.tar.NN`` parts holding ``ckpt/ckpt.pt`` and ``model/**``; return ``[{file, bytes,
    sha256}]``. Old parts of ``name`` are removed first, so a re-pack never mixes two runs."""
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
        if model_dir.is_dir():
            tar.add(model_dir, arcname="model")
    blob = buf.getvalue()
    parts = []
    for i in range(0, max(1, len(blob)), part_bytes):
        path = out / f"{name}.tar.{i // part_bytes:02d}"
        chunk = blob[i:i + part_bytes]
        path.write_bytes(chunk)
        parts.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return parts


def unpack(name: str, src: Path, dest: Path) -> Path:
    """Join ``src/<name>.tar.NN`` and extract to ``dest/<name>/`` (``ckpt/``, ``model/``); return that folder."""
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
    return target
