"""HeadHunter search driver on the tiny SD3 pipeline with a toy objective (mean brightness)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mmeff
from mmeff import ConfigError
from mmeff.guidance import HeadHunter, SoftPAG

PROMPTS = ["a red cube", "a blue ball"]
CALL = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 1.0, "max_sequence_length": 16,
        "output_type": "np"}


def brightness(images, prompts):
    return [float(np.asarray(im).mean()) for im in images]


class Interrupt(Exception):
    pass


def _hunter(pipe, objective, state, **kw):
    return HeadHunter(pipe, objective, PROMPTS, rounds=2, top_k=1, call_kwargs=CALL, state_path=state,
                      progress=False, **kw)


def test_two_rounds_resume_and_preset(pipes, tmp_path):
    pipe = pipes("sd3")
    ref = _hunter(pipe, brightness, tmp_path / "ref.json").run()
    assert len(ref.candidates) == 2 and len(ref.history) == 2
    assert len(ref.history[0]["scores"]) == 8 and len(ref.history[1]["scores"]) == 7  # 2 layers x 4 heads
    best = max(ref.history[0]["scores"], key=ref.history[0]["scores"].get)
    assert ref.candidates[0] == best
    # top_k=1: the round-0 selection is the best candidate alone, so its score repeats exactly
    assert ref.history[0]["selection_score"] == ref.history[0]["scores"][best]
    plain = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **CALL).images
    assert ref.baseline == pytest.approx(float(np.mean([np.asarray(im).mean() for im in plain])))
    assert ref.baseline not in ref.history[0]["scores"].values()  # every candidate changes the images

    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupt
        return brightness(images, prompts)

    state = tmp_path / "state.json"
    with pytest.raises(Interrupt):
        _hunter(pipe, flaky, state).run()
    saved = json.loads(state.read_text())
    assert saved["round"] == 0 and len(saved["scores"]) == 2 and saved["baseline"] == ref.baseline
    hunter = _hunter(pipe, flaky, state)
    res = hunter.run()
    # baseline + 8 + 7 candidates + one selection score per round; the baseline and 2 candidates were saved
    assert hunter.evaluations == 18 - 3  # only the missing ones were generated
    assert res.candidates == ref.candidates
    assert json.loads(state.read_text())["done"]
    assert _hunter(pipe, flaky, state).run().candidates == ref.candidates  # finished state: nothing to do
    # keep="best": the selection after the best-scoring round, read from the same finished state
    best_hunter = _hunter(pipe, flaky, state, keep="best")
    kept = best_hunter.run()
    scores = [h["selection_score"] for h in ref.history]
    r_best = scores.index(max(scores))
    assert best_hunter.evaluations == 0 and kept.meta["kept_round"] == r_best
    assert kept.candidates == ref.candidates[: r_best + 1]
    with pytest.raises(ConfigError, match="keep must be"):
        _hunter(pipe, flaky, state, keep="first")

    preset = res.save_preset(tmp_path / "preset.json")
    data = json.loads(preset.read_text())
    assert data["heads"] == [f"{l},{h}" for l, h in res.heads] and data["model"] == "SD3Transformer2DModel"
    cfg = SoftPAG(preset=str(preset), u=0.5)
    assert cfg.head_pairs() == tuple(sorted(res.heads))
    with mmeff.apply(pipe, cfg) as h:
        pipe(prompt=PROMPTS[0], generator=torch.Generator().manual_seed(0), **CALL)
    assert h.report()["per_method"]["softpag"]["n_heads"] == 2


def test_layer_search_expands_to_heads(pipes, tmp_path):
    pipe = pipes("sd3")
    res = HeadHunter(pipe, brightness, PROMPTS[:1], rounds=1, top_k=1, candidates="layers", call_kwargs=CALL,
                     progress=False).run()
    assert len(res.candidates) == 1 and "." not in res.candidates[0]
    layer = int(res.candidates[0])
    assert res.heads == [(layer, h) for h in range(4)]


def test_state_from_another_search_is_refused(pipes, tmp_path):
    pipe = pipes("sd3")
    state = tmp_path / "s.json"
    HeadHunter(pipe, brightness, PROMPTS[:1], rounds=1, top_k=1, candidates=["0.0", (1, 2)], call_kwargs=CALL,
               state_path=state, progress=False).run()
    with pytest.raises(ConfigError, match="different search"):
        HeadHunter(pipe, brightness, PROMPTS[:1], rounds=1, top_k=1, candidates=["0.1"], call_kwargs=CALL,
                   state_path=state, progress=False).run()
    with pytest.raises(ConfigError, match="does not exist"):
        HeadHunter(pipe, brightness, PROMPTS[:1], candidates=[(0, 7)], call_kwargs=CALL)
