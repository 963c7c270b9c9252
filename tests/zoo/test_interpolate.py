"""WiSE-FT interpolation of a zoo model and its fine-tune (mmeff.zoo.interpolate)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmeff.zoo.interpolate import interpolate, main, write_mix


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(4, generator=g),
            "steps": torch.tensor([seed])}


def test_interpolation_endpoints_and_midpoint():
    p, t = _weights(0), _weights(1)
    for name in p:
        if p[name].is_floating_point():
            assert torch.equal(interpolate(p, t, 0.0)[name], p[name])
            assert torch.allclose(interpolate(p, t, 1.0)[name], t[name])
            assert torch.allclose(interpolate(p, t, 0.25)[name], 0.75 * p[name] + 0.25 * t[name])
    assert torch.equal(interpolate(p, t, 0.5)["steps"], p["steps"])  # integer buffers stay the parent's


def test_mismatches_are_refused():
    p = _weights(0)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(p, p, 1.5)
    with pytest.raises(ValueError, match="differ in parameters"):
        interpolate(p, {k: v for k, v in p.items() if k != "b.bias"}, 0.5)
    with pytest.raises(ValueError, match="a.weight"):
        interpolate(p, {**p, "a.weight": torch.zeros(4, 3)}, 0.5)


def test_write_mix_saves_weights_and_lineage(tmp_path, capsys):
    parent, tuned, out = tmp_path / "parent", tmp_path / "tuned", tmp_path / "mix"
    for folder, seed in ((parent, 0), (tuned, 1)):
        folder.mkdir()
        save_file(_weights(seed), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (tuned / "training.json").write_text(json.dumps({"model": "tiny-llava", "history": [1, 2]}))
    write_mix(parent, tuned, 0.5, out)
    mixed = load_file(str(out / "model.safetensors"))
    assert torch.allclose(mixed["a.weight"], 0.5 * (_weights(0)["a.weight"] + _weights(1)["a.weight"]))
    assert json.loads((out / "config.json").read_text()) == {"seed": 1}
    info = json.loads((out / "training.json").read_text())
    assert info["model"] == "tiny-llava" and "history" not in info and info["interpolation"]["alpha"] == 0.5
    with pytest.raises(SystemExit):
        main(["--parent", str(tmp_path / "nowhere"), "--tuned", str(tuned), "--alpha", "0.5", "--out", str(out)])
    assert "no model.safetensors" in capsys.readouterr().err
