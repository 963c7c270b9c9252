"""Rendering of shapes-world scenes to PIL images, still or moving.

Shapes are flat filled polygons drawn with ``PIL.ImageDraw`` (no anti-aliasing at the
native size, so the image is a pure function of the scene). Requests for a size smaller
than the scene's native size (e.g. 32 or 64 px for the tiny diffusion models) draw at the
native size and box-downsample, which keeps thin details (the star's points, the word)
as soft but faithful blobs instead of aliasing them away.

Videos: each object gets a constant velocity drawn from ``seed`` and bounces off the
canvas borders (its footprint, label included, always stays inside the canvas).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from .scene import BACKGROUNDS, COLOURS, LABEL_GAP, LABEL_H, Obj, Scene, label_width

Size = int | tuple[int, int]

_LABEL_FILL = (255, 255, 255)
_LABEL_INK = (0, 0, 0)


@lru_cache(maxsize=32)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``px`` pixels (no system font needed)."""
    try:
        return ImageFont.load_default(size=px)
    except (ImportError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def shape_polygon(
    shape: str, cx: float, cy: float, r: float
) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with half-extent ``r`` pixels
    (circles are approximated by a 48-gon only when a polygon is required)."""
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - 0.9 * r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.1 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = 0.3 * r
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    if shape == "circle":
        return [
            (
                cx + r * math.cos(2 * math.pi * k / 48),
                cy + r * math.sin(2 * math.pi * k / 48),
            )
            for k in range(48)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def label_box(o: Obj, w: int, h: int) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) of the white label under ``o`` on a ``w`` x ``h`` canvas."""
    unit = min(w, h)
    cx, cy, r = o.x * w, o.y * h, o.radius * unit
    lw, lh = label_width(o.word or "") * unit, LABEL_H * unit
    top = cy + r + LABEL_GAP * unit
    return (cx - lw / 2, top, cx + lw / 2, top + lh)


def draw_shape(draw: ImageDraw.ImageDraw, o: Obj, w: int, h: int, fill: int | tuple[int, ...]) -> None:
    """Fill ``o``'s shape (label excluded) with ``fill`` on a ``w`` x ``h`` canvas."""
    unit = min(w, h)
    cx, cy, r = o.x * w, o.y * h, o.radius * unit
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(shape_polygon(o.shape, cx, cy, r), fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, w: int, h: int) -> None:
    unit = min(w, h)
    cx = o.x * w
    draw_shape(draw, o, w, h, COLOURS[o.colour])
    if o.word is not None:
        box = label_box(o, w, h)
        lw, top, lh = box[2] - box[0], box[1], box[3] - box[1]
        draw.rectangle(
            box, fill=_LABEL_FILL, outline=_LABEL_INK, width=max(1, round(unit / 200))
        )
        px = max(6, round(0.06 * unit))
        font = _font(px)
        while px > 6 and draw.textlength(o.word, font=font) > lw - 4:
            px -= 1
            font = _font(px)
        draw.text((cx, top + lh / 2), o.word, fill=_LABEL_INK, font=font, anchor="mm")


def _target(scene: Scene, size: Size | None) -> tuple[int, int]:
    if size is None:
        return scene.width, scene.height
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def render(
    scene: Scene, size: Size | None = None, *, small_size: Size | None = None
) -> Image.Image:
    """Render ``scene`` as an RGB image.

    ``size`` (int for square, or (width, height)) defaults to the scene's native size;
    ``small_size`` is an alias of ``size``. Smaller sizes are drawn natively and
    box-downsampled; larger ones are drawn directly at that size.
    """
    w, h = _target(scene, small_size if small_size is not None else size)
    native_w, native_h = scene.width, scene.height
    draw_w, draw_h = (native_w, native_h) if (w < native_w and h < native_h) else (w, h)
    img = Image.new("RGB", (draw_w, draw_h), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o, draw_w, draw_h)
    if (draw_w, draw_h) != (w, h):
        img = img.resize((w, h), Image.Resampling.BOX)
    return img


# --------------------------------------------------------------------------- video


def _bounce(p: float, lo: float, hi: float) -> float:
    """Position ``p`` folded into [lo, hi] as if reflecting off both ends."""
    span = hi - lo
    if span <= 0:
        return lo
    q = (p - lo) % (2 * span)
    return lo + (2 * span - q if q > span else q)


def object_velocities(
    scene: Scene, *, seed: int, speed: tuple[float, float] = (0.01, 0.03)
) -> list[tuple[float, float]]:
    """Constant per-object velocities (normalised units per frame) drawn from ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in scene.objects:
        v = rng.uniform(*speed)
        a = rng.uniform(0, 2 * math.pi)
        out.append((round(v * math.cos(a), 5), round(v * math.sin(a), 5)))
    return out


def video_scenes(
    scene: Scene, n_frames: int, *, seed: int, speed: tuple[float, float] = (0.01, 0.03)
) -> list[Scene]:
    """The scene at each frame: frame 0 is ``scene``; objects move with constant
    velocities and bounce so their footprint stays inside the canvas. Objects may pass
    over each other mid-video (later objects are drawn on top)."""
    vel = object_velocities(scene, seed=seed, speed=speed)
    aspect = scene.width / scene.height
    sx = 1.0 / aspect if aspect > 1 else 1.0
    sy = aspect if aspect < 1 else 1.0
    frames = []
    for t in range(n_frames):
        objs = []
        for o, (vx, vy) in zip(scene.objects, vel):
            left, top, right, bottom = o.extent()
            lo_x, hi_x = min(o.x, left * sx), max(o.x, 1 - right * sx)
            lo_y, hi_y = min(o.y, top * sy), max(o.y, 1 - bottom * sy)
            x = _bounce(o.x + vx * t, lo_x, hi_x)
            y = _bounce(o.y + vy * t, lo_y, hi_y)
            objs.append(replace(o, x=x, y=y))
        frames.append(scene.with_objects(objs))
    return frames


def render_video(
    scene: Scene,
    n_frames: int,
    *,
    seed: int,
    size: Size | None = None,
    speed: tuple[float, float] = (0.01, 0.03),
) -> list[Image.Image]:
    """Render ``n_frames`` frames of ``scene`` in motion (see :func:`video_scenes`)."""
    return [
        render(s, size) for s in video_scenes(scene, n_frames, seed=seed, speed=speed)
    ]
