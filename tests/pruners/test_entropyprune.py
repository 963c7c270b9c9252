"""EntropyPrune math, the ECL finder and its calibration file."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff.calibrate import calibrate_entropyprune, find_ecl
from mmeff.pruners import EntropyPrune
from mmeff.pruners.entropy_math import (representation_entropy, token_matrix_entropy,
                                        token_matrix_entropy_direct)
from mmeff.zoo import tiny_models as tm


@pytest.mark.parametrize("norm", ["code", "trace"])
@pytest.mark.parametrize("heads,dim", [(4, 16), (32, 128), (8, 256)])
def test_gram_trick_equals_direct_covariance(norm, heads, dim):
    r = torch.randn(20, heads, dim, generator=torch.Generator().manual_seed(heads))
    fast = token_matrix_entropy(r, norm)
    slow = token_matrix_entropy_direct(r, norm)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)


def test_entropy_matches_hand_computation():
    """One token, 3 heads, d=2: compare with an explicit eigen-decomposition of the covariance."""
    r = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)
    c = r[0] - r[0].mean(0)
    lam = torch.linalg.eigvalsh(c.T @ c / 3).clamp_min(1e-10)
    expected = -(lam * lam.log()).sum() / torch.log(torch.tensor(3.0, dtype=torch.float64))
    got = token_matrix_entropy(r.float(), "code")
    assert got.item() == pytest.approx(expected.item(), abs=1e-7)  # the extra zero eigenvalue adds ~2e-9


def test_rank_one_tokens_have_low_entropy_and_isotropic_high():
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(8, 16, 64, generator=g)
    rank1 = torch.randn(8, 16, 1, generator=g) * torch.randn(8, 1, 64, generator=g)
    assert (token_matrix_entropy(iso, "trace") > token_matrix_entropy(rank1, "trace") + 0.3).all()
    x = torch.randn(50, 32, generator=g)
    assert representation_entropy(x) > 0.8
    assert representation_entropy(x[:, :1].repeat(1, 32)) < 0.05


def test_find_ecl_picks_the_sharpest_drop():
    assert find_ecl([0.9, 0.88, 0.5, 0.45, 0.44]) == 2
    assert find_ecl([0.9, 0.2, 0.19]) == 1


def test_budget_conversion_matches_the_paper():
    # LLaVA-1.5-7B: L=32, N=576, K=2: budgets 192/128/64 -> 166/98/29 kept after layer 2
    assert [EntropyPrune(budget=b).keep_count(576, 32, 2) for b in (192, 128, 64)] == [166, 98, 29]


def test_calibration_file_sets_the_layer(tmp_path):
    model = tm.tiny_llava()
    batches = [tm.make_inputs(model, [([2, 5], [7, 8])], seed=s) for s in range(3)]
    path = tmp_path / "ecl.json"
    res = calibrate_entropyprune(model, batches, path, progress=False)
    data = json.loads(path.read_text())
    assert data["ecl"] == res["ecl"] and len(data["layer_entropy"]) == 4 and data["samples"] == 3
    assert 1 <= data["ecl"] <= 3
    cfg = EntropyPrune(budget=16, calibration=str(path))
    assert cfg.resolve_layer("llava") == data["ecl"]
    with mmeff.apply(model, mmeff.parse_method(f"entropyprune:budget=12,calibration={path}")) as h:
        model.generate(**batches[0], max_new_tokens=2)
    assert h.report()["layer"] == data["ecl"]
    with pytest.raises(mmeff.ConfigError, match="mmeff calibrate"):
        EntropyPrune(budget=16, calibration=str(tmp_path / "missing.json"))
