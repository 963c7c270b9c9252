"""Can a given image network read *shape* from shapes-world pixels in a few CPU minutes?

Diagnostic behind :mod:`mmeff.zoo.local_attention_init`. Every network here starts from the
same linear 14 px patch embedding (LLaVA's 24x24 grid) and is trained on the per-patch shape
labels of :mod:`mmeff.zoo.world.labels`; they differ only in how patches are mixed:

* ``vit``: the zoo's CLIP tower (64 wide, 3 layers, 4 heads), stock initialisation;
* ``vit-local``: the same tower with the convolution-like start;
* ``vit-hard``: that start kept frozen, attention computed as the hard fixed-offset gather
  (:mod:`mmeff.zoo.fixed_offset_attention`), as in the zoo's vision-only training steps;
* ``vit-frozen``: that start kept frozen but computed with softmax attention, as the saved model
  computes it (``--position-gain`` sets how loudly the position channels leave the first
  LayerNorm); the local kinds also log ``soft_offset_agreement``, per layer the share of rows
  whose softmax attention peaks at the head's offset;
* ``taps``: the same mixing the local start gives, as explicit shifts (4 neighbour taps of rank
  16 per layer, alternating 4-neighbourhood and diagonals), in a pre-LN residual CNN;
* ``conv``: pre-LN residual CNN with full 3x3 convolutions.

Validation on held-out scenes reports per-patch accuracy on object edges and interiors and the
per-object accuracy (mean prediction over an object's patches). Usage::

    python scripts/shape_probe.py --kind taps --minutes 4 --out runs/shape-probe-taps.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmeff.eval.report import versions
from mmeff.zoo.local_attention_init import DIAGONALS, NEIGHBOURS, init_clip_tower
from mmeff.zoo.world import generate_scene, render
from mmeff.zoo.world.dataset import SPLITS
from mmeff.zoo.world.labels import N_CLASSES, object_id_map, patch_labels

GRID, PATCH, WIDTH = 24, 14, 64
N_SHAPE = N_CLASSES["shape"]
MEAN = torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1)
STD = torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1)


def scenes(split: str, n: int) -> dict[str, torch.Tensor]:
    """Normalised images, per-cell shape labels and per-cell object ids of ``n`` scenes."""
    lo = SPLITS[split][0]
    imgs, shapes, objs = [], [], []
    for seed in range(lo, lo + n):
        sc = generate_scene(seed)
        imgs.append(torch.from_numpy(np.array(render(sc))).permute(2, 0, 1))
        shapes.append(torch.from_numpy(patch_labels(sc, GRID).shape))
        ids = torch.from_numpy(object_id_map(sc).astype(np.int64))
        cells = ids.view(GRID, PATCH, GRID, PATCH).permute(0, 2, 1, 3).reshape(GRID, GRID, -1)
        major = torch.mode(cells, dim=-1).values
        major[major >= 128] = 0  # word labels are not objects
        objs.append(major)
    x = (torch.stack(imgs).float() / 255 - MEAN) / STD
    return {"x": x, "shape": torch.stack(shapes).view(n, -1), "obj": torch.stack(objs).view(n, -1)}


class LN2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Taps(nn.Module):
    """Sum over offsets of a rank-``rank`` map of the shifted input (attention with fixed offsets)."""

    def __init__(self, offsets: tuple[tuple[int, int], ...], rank: int):
        super().__init__()
        self.offsets = offsets
        self.v = nn.ModuleList(nn.Conv2d(WIDTH, rank, 1) for _ in offsets)
        self.o = nn.ModuleList(nn.Conv2d(rank, WIDTH, 1) for _ in offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(o(torch.roll(v(x), shifts=(-dy, -dx), dims=(2, 3)))
                   for (dx, dy), v, o in zip(self.offsets, self.v, self.o))


class ResCNN(nn.Module):
    """Pre-LN residual network on the patch grid: mixing block then MLP block, three times."""

    def __init__(self, taps: bool):
        super().__init__()
        self.stem, self.pre = nn.Conv2d(3, WIDTH, PATCH, PATCH), LN2d(WIDTH)
        mix = [Taps(o, 16) if taps else nn.Conv2d(WIDTH, WIDTH, 3, 1, 1) for o in (NEIGHBOURS, DIAGONALS, NEIGHBOURS)]
        self.mix = nn.ModuleList(nn.Sequential(LN2d(WIDTH), m) for m in mix)
        self.mlp = nn.ModuleList(nn.Sequential(LN2d(WIDTH), nn.Conv2d(WIDTH, 2 * WIDTH, 1), nn.GELU(),
                                               nn.Conv2d(2 * WIDTH, WIDTH, 1)) for _ in mix)
        self.head = nn.Conv2d(WIDTH, N_SHAPE, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(self.stem(x))
        for mix, mlp in zip(self.mix, self.mlp):
            x = x + mix(x)
            x = x + mlp(x)
        return self.head(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, local: bool, hard: bool = False, frozen: bool = False, position_gain: float = 8.0,
                 dominant: float | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                                      num_hidden_layers=3, num_attention_heads=4,
                                                      image_size=GRID * PATCH, patch_size=PATCH))
        self.local_start = local or hard or frozen
        if self.local_start:
            init_clip_tower(self.tower, GRID, position_gain=position_gain, dominant=dominant)
        self.hard = None
        if hard or frozen:
            from types import SimpleNamespace

            from mmeff.zoo.fixed_offset_attention import FixedOffsetMode
            from mmeff.zoo.local_attention_init import freeze_local_attention

            host = SimpleNamespace(model=SimpleNamespace(vision_tower=self.tower))  # as in the zoo VLMs
            if hard:
                self.hard = FixedOffsetMode(host, GRID)
                self.hard.on()
            freeze_local_attention(host)
        self.head = nn.Linear(WIDTH, N_SHAPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=x).last_hidden_state[:, 1:])


@torch.no_grad()
def offset_agreement(vit: "ViT", x: torch.Tensor) -> list[float]:
    """Per layer: share of (patch token, head) rows with a neighbour at the head's offset whose
    *softmax* attention peaks there, i.e. how far the saved model's stock attention equals the
    hard pattern it was trained with."""
    from mmeff.zoo.fixed_offset_attention import clip_source
    from mmeff.zoo.local_attention_init import head_offsets

    cfg = vit.tower.config
    before = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        att = vit.tower(pixel_values=x, output_attentions=True).attentions
    finally:
        cfg._attn_implementation = before
    out = []
    for li, a in enumerate(att):
        src = clip_source(GRID, cfg.num_attention_heads, li)  # [H, N]
        peak = a.argmax(-1)  # [B, H, N]
        # rows whose offset leaves the grid are clamped to themselves by the hard gather; the soft
        # attention has no such target, so only rows with a real neighbour count
        rc = torch.arange(GRID * GRID)
        r, c = rc // GRID, rc % GRID
        inside = torch.stack([(r + dy >= 0) & (r + dy < GRID) & (c + dx >= 0) & (c + dx < GRID)
                              for dx, dy in head_offsets(cfg.num_attention_heads, li)])
        inside = torch.cat([torch.zeros(len(inside), 1, dtype=torch.bool), inside], dim=1)  # CLS row out
        hit = (peak == src[None]) & inside[None]
        out.append(round(float(hit.sum() / (inside.sum() * a.shape[0])), 4))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, val: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    logits = torch.cat([model(val["x"][i : i + 50]) for i in range(0, len(val["x"]), 50)])
    model.train()
    tgt, obj = val["shape"], val["obj"]
    o = obj.view(-1, 1, GRID, GRID).float()
    interior = ((F.max_pool2d(o, 3, 1, 1) == o) & (-F.max_pool2d(-o, 3, 1, 1) == o)).view_as(obj)
    ok, fg = logits.argmax(-1) == tgt, tgt > 0
    right = total = 0
    for b in range(len(obj)):
        for k in obj[b].unique().tolist():
            m = (obj[b] == k) & fg[b]
            if k and m.any():
                right += int(logits[b][m].softmax(-1).mean(0)[1:].argmax() + 1 == tgt[b][m][0])
                total += 1
    out = {"edge": float(ok[fg & ~interior].float().mean()), "interior": float(ok[fg & interior].float().mean()),
           "object": right / max(total, 1)}
    if isinstance(model, ViT) and model.local_start:
        out["soft_offset_agreement"] = offset_agreement(model, val["x"][:20])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("vit", "vit-local", "vit-hard", "vit-frozen", "taps", "conv"), required=True,
                   help="vit-frozen: the conv-like start kept frozen but computed with softmax attention")
    p.add_argument("--position-gain", type=float, default=8.0, help="CLIP position-channel gain (vit-local/hard/frozen)")
    p.add_argument("--dominant", type=float, default=None,
                   help="position-dominant LayerNorms (local_attention_init.init_clip_tower(dominant=...))")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--val-scenes", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("rendering scenes ...", flush=True)
    train, val = scenes("train", args.train_scenes), scenes("val", args.val_scenes)
    model = (ViT(args.kind == "vit-local", args.kind == "vit-hard", args.kind == "vit-frozen", args.position_gain,
                 args.dominant)
             if args.kind.startswith("vit") else ResCNN(args.kind == "taps"))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    history, step, t0, next_eval = [], 0, time.time(), 0.0
    while time.time() - t0 < args.minutes * 60:
        idx = torch.randint(0, len(train["x"]), (16,))
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        tgt = train["shape"][idx]
        ce = F.cross_entropy(model(train["x"][idx]).reshape(-1, N_SHAPE), tgt.reshape(-1), reduction="none").view_as(tgt)
        loss = (ce[tgt > 0].mean() + ce[tgt == 0].mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if time.time() - t0 >= next_eval:
            next_eval += 60.0
            row = {"step": step, "minutes": round((time.time() - t0) / 60, 2), **evaluate(model, val)}
            history.append(row)
            print(json.dumps(row), flush=True)
    history.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), **evaluate(model, val)})
    print("final", json.dumps(history[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": vars(args), "versions": versions(), "history": history}, indent=1))


if __name__ == "__main__":
    main()
