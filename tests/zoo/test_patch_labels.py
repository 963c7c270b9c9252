"""Per-patch training targets of the shapes world and the auxiliary head that reads them."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmeff.zoo.world import generate_scene
from mmeff.zoo.world.labels import N_CLASSES, object_id_map, patch_labels
from mmeff.zoo.world.scene import COLOURS, SHAPES, WORDS


@pytest.mark.parametrize("grid", [24, 12])
def test_labels_name_every_object_and_its_word(grid):
    for seed in range(40):
        scene = generate_scene(seed)
        lab = patch_labels(scene, grid)
        assert lab.shape.shape == (grid, grid) and lab.centre.shape == (grid, grid, 2)
        for o in scene.objects:
            s, c = 1 + SHAPES.index(o.shape), 1 + list(COLOURS).index(o.colour)
            cells = (lab.shape == s) & (lab.colour == c) & np.isclose(lab.centre[..., 0], o.x)
            assert cells.any(), f"seed {seed}: {o} has no cell at grid {grid}"
            # the cells sit where the object is: their centres are within the object's radius + one cell
            rows, cols = np.nonzero(cells)
            assert np.all(np.abs((cols + 0.5) / grid - o.x) <= o.radius + 1 / grid)
            assert np.all(np.abs((rows + 0.5) / grid - o.y) <= o.radius + 1 / grid)
        word_cells = lab.word > 0
        if scene.word is None:
            assert not word_cells.any()
        else:
            assert set(np.unique(lab.word[word_cells])) == {1 + WORDS.index(scene.word)}
        assert ((lab.shape > 0) == (lab.colour > 0)).all() and ((lab.shape > 0) == (lab.size > 0)).all()
        for key, n in N_CLASSES.items():
            assert getattr(lab, key).max() < n


def test_labels_are_deterministic_and_match_the_id_map():
    scene = generate_scene(123)
    a, b = patch_labels(scene, 24), patch_labels(scene, 24)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("shape", "colour", "size", "word", "centre"))
    ids = object_id_map(scene)
    assert ids.shape == (scene.height, scene.width)
    assert set(np.unique(ids)) <= {0, *range(1, len(scene.objects) + 1), *range(128, 128 + len(scene.objects))}


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_aux_head_reads_the_features_the_lm_receives(name, one_thread):
    """The capture hook sees one feature per grid cell, and a few steps on a fixed batch
    lower the patch loss (the targets are learnable from the features)."""
    from mmeff.zoo.isolated_turns import isolate_turns
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model
    from mmeff.zoo.vision_aux import FeatureCapture, VisionAuxHead, class_token_ids, image_features_only

    proc = build_processor(ZOO_MODELS[name])
    model = build_model(name, proc, layers=2)
    qwen = name == "tiny-qwen2-vl"
    batcher = Batcher(name, proc)
    inputs, targets = _split_aux(batcher.images([3, 4]))
    cap = FeatureCapture(model, qwen)
    head = VisionAuxHead(model.config.text_config.hidden_size, class_token_ids(proc.tokenizer))
    embed = model.get_input_embeddings().weight
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    losses = []
    for _ in range(6):
        image_features_only(model, inputs, qwen)
        feats = cap.take(2)
        assert feats.shape[:2] == (2, batcher.grid**2) == targets["shape"].shape
        loss, _ = head.loss(feats, targets, embed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    cap.remove()
    assert losses[-1] < 0.8 * losses[0]
    # the full forward still works with the hook gone, and no features are left captured
    seq_inputs, _ = _split_aux(batcher.batch([3], random.Random(0)))
    seq_inputs = isolate_turns(model, seq_inputs)
    assert torch.isfinite(model(**seq_inputs, use_cache=False).loss)
    with pytest.raises(RuntimeError, match="no image features"):
        cap.take(1)
