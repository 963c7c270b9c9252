"""Per-patch ground truth of a scene: which object (shape, colour, size, centre) or which
printed word covers each cell of a patch grid.

Used as dense auxiliary supervision when training the zoo VLMs' vision towers from
scratch: a language-model loss alone sends too weak a signal through a 576-token image
for a tiny ViT to learn colours and shapes in CPU-minutes, so the tower is also asked to
say, per patch, what lies under it (like a CLIP tower that already "knows" the world).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .render import draw_shape, label_box
from .scene import COLOURS, SHAPES, SIZES, WORDS, Scene

MIN_COVER = 0.2
"""A cell is labelled with an object (or word) only if it covers at least this share of it."""

_WORD_BASE = 128  # id-map value of object k's label box: _WORD_BASE + k


@dataclass(frozen=True)
class PatchLabels:
    """Targets on a ``grid`` x ``grid`` cell grid (row-major, rows top to bottom).

    ``shape``/``colour``/``size``: 0 for background, else 1 + index into
    :data:`SHAPES` / :data:`COLOURS` / :data:`SIZES`. ``word``: 0 for none, else 1 + index
    into :data:`WORDS` (cells of the word's white label). ``centre``: the covering object's
    normalised (x, y) centre, 0 where ``shape`` is 0.
    """

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    word: np.ndarray
    centre: np.ndarray

    @property
    def grid(self) -> int:
        return int(self.shape.shape[0])


def object_id_map(scene: Scene) -> np.ndarray:
    """[H, W] uint8 map at the scene's native size: 0 background, k+1 where object k's
    shape is drawn, ``128 + k`` on object k's word label."""
    w, h = scene.width, scene.height
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for k, o in enumerate(scene.objects):
        draw_shape(draw, o, w, h, k + 1)
        if o.word is not None:
            draw.rectangle(label_box(o, w, h), fill=_WORD_BASE + k)
    return np.asarray(img)


def _cell_majority(ids: np.ndarray, grid: int, values: list[int]) -> np.ndarray:
    """Per cell: the value of ``values`` covering most of the cell if >= MIN_COVER, else 0."""
    h, w = ids.shape
    ch, cw = h // grid, w // grid
    cells = ids[: ch * grid, : cw * grid].reshape(grid, ch, grid, cw)
    best = np.zeros((grid, grid), dtype=np.int64)
    best_share = np.full((grid, grid), MIN_COVER)
    for v in values:
        share = (cells == v).mean(axis=(1, 3))
        take = share >= best_share
        best[take] = v
        best_share = np.where(take, share, best_share)
    return best


def patch_labels(scene: Scene, grid: int) -> PatchLabels:
    """Per-cell targets of ``scene`` on a ``grid`` x ``grid`` grid (see :class:`PatchLabels`)."""
    ids = object_id_map(scene)
    n = len(scene.objects)
    obj_ids = _cell_majority(ids, grid, list(range(1, n + 1)))
    word_ids = _cell_majority(ids, grid, [_WORD_BASE + k for k, o in enumerate(scene.objects) if o.word])
    shape = np.zeros((grid, grid), dtype=np.int64)
    colour = np.zeros_like(shape)
    size = np.zeros_like(shape)
    word = np.zeros_like(shape)
    centre = np.zeros((grid, grid, 2), dtype=np.float32)
    colours, sizes = list(COLOURS), list(SIZES)
    for k, o in enumerate(scene.objects):
        m = obj_ids == k + 1
        shape[m] = 1 + SHAPES.index(o.shape)
        colour[m] = 1 + colours.index(o.colour)
        size[m] = 1 + sizes.index(o.size)
        centre[m] = (o.x, o.y)
        if o.word is not None:
            word[word_ids == _WORD_BASE + k] = 1 + WORDS.index(o.word)
    return PatchLabels(shape, colour, size, word, centre)


N_CLASSES: dict[str, int] = {
    "shape": 1 + len(SHAPES),
    "colour": 1 + len(COLOURS),
    "size": 1 + len(SIZES),
    "word": 1 + len(WORDS),
}
"""Number of classes of each categorical target (background/none included)."""
