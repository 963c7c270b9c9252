"""Do a layout video's objects persist and move the way its prompt says? Pixel checks, no model.

A layout video prompt (:func:`mmeff.zoo.world.layout.make_layout_video_prompt`) names each object's colour, its
cell in the first frame and a direction. For each object, in the generated video:

- **present in a frame**: at least :func:`~mmeff.eval.t2i_fidelity.min_colour_pixels` pixels of its palette
  colour (same test as the colour check) within a window around where the object should be in that frame
  (its half-extent plus :data:`SLACK` of the canvas);
- **persists**: present in every checked frame (first, middle, last);
- **moves as named**: the centroid of its colour's pixels, inside a window that covers its whole path, moves
  between the first and last frame by at least half the expected travel along the named direction, and less
  across it than along it.

Windows are clipped to the canvas. Two objects of the same colour whose windows overlap can count each other's
pixels; layout scenes keep objects in distinct cells, so this is rare.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SLACK = 0.06
"""Extra window margin around an object's expected footprint (fraction of the canvas)."""


def _window(mask: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> tuple[np.ndarray, int, int]:
    h, w = mask.shape
    c0, c1 = max(0, int(np.floor(x0 * w))), min(w, int(np.ceil(x1 * w)))
    r0, r1 = max(0, int(np.floor(y0 * h))), min(h, int(np.ceil(y1 * h)))
    return mask[r0:r1, c0:c1], r0, c0


def motion_checks(video: Any, scene: Any, frames: int | None = None) -> dict[str, Any]:
    """Per object of the layout ``scene``: presence in the first, middle and last frame, persistence and motion
    in the named direction. ``video``: ``[T, C, H, W]`` or ``[T, H, W, C]`` in [0, 1] (or uint8)."""
    from ..zoo.world import SIZES
    from ..zoo.world.layout import DIRECTIONS, layout_video_scenes
    from .t2i_fidelity import colour_mask, min_colour_pixels, to_uint8

    arr = np.asarray(video)
    if arr.ndim == 4 and arr.shape[1] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    arr = np.stack([to_uint8(f) for f in arr]).astype(np.float64)
    t_count, h, w = arr.shape[:3]
    per_frame, dirs = layout_video_scenes(scene, frames or t_count)
    checked = sorted({0, t_count // 2, t_count - 1})
    need = min_colour_pixels(min(h, w))
    rows = []
    for i, o in enumerate(scene.objects):
        r = SIZES[o.size] + SLACK
        present = {}
        for f in checked:
            p = per_frame[f].objects[i]
            win, _, _ = _window(colour_mask(arr[f], o.colour), p.x - r, p.y - r, p.x + r, p.y + r)
            present[f] = bool(win.sum() >= need)
        first, last = per_frame[0].objects[i], per_frame[-1].objects[i]
        box = (min(first.x, last.x) - r, min(first.y, last.y) - r, max(first.x, last.x) + r, max(first.y, last.y) + r)
        cents = []
        for f in (0, t_count - 1):
            win, r0, c0 = _window(colour_mask(arr[f], o.colour), *box)
            ys, xs = np.nonzero(win)
            cents.append(None if len(xs) < need else ((xs.mean() + c0) / w, (ys.mean() + r0) / h))
        dx, dy = DIRECTIONS[dirs[i]]
        travel = float(np.hypot(last.x - first.x, last.y - first.y))
        moved = None
        if cents[0] is not None and cents[1] is not None:
            mx, my = cents[1][0] - cents[0][0], cents[1][1] - cents[0][1]
            along, across = mx * dx + my * dy, abs(mx * dy - my * dx)
            moved = {"along": round(float(along), 4), "across": round(float(across), 4),
                     "ok": bool(along >= 0.5 * travel and across < along)}
        rows.append({"object": f"{o.colour} {o.shape}", "direction": dirs[i], "present": present,
                     "persists": all(present.values()), "moved": moved,
                     "moves_as_named": bool(moved is not None and moved["ok"])})
    return {"objects": rows, "frames_checked": checked,
            "all_persist": all(r["persists"] for r in rows),
            "all_move_as_named": all(r["moves_as_named"] for r in rows)}


def summarise_motion(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Shares over objects (and over videos, for the ``all_`` keys) of :func:`motion_checks` rows."""
    objs = [o for r in rows for o in r["objects"]]
    return {"object_persists": float(np.mean([o["persists"] for o in objs])),
            "object_moves_as_named": float(np.mean([o["moves_as_named"] for o in objs])),
            "video_all_persist": float(np.mean([r["all_persist"] for r in rows])),
            "video_all_move_as_named": float(np.mean([r["all_move_as_named"] for r in rows])),
            "n_videos": len(rows), "n_objects": len(objs)}
