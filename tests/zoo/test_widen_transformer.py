"""Function-preserving width doubling of a Wan transformer (mmeff.zoo.widen_transformer)."""
from __future__ import annotations

import pytest
import torch

from mmeff.zoo.widen_transformer import widen_wan_transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def small_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    # freq_dim and text_dim equal the hidden size, as in tiny-wan, so no rule can go by shape alone
    kw = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
          "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
          "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}
    kw.update(overrides)
    tr = WanTransformer3DModel(**kw)
    with torch.no_grad():  # a "trained" model: every parameter away from its initialisation
        for p in tr.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return tr.eval()


def run(tr, x, t, e):
    return tr(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([100.0, 900.0]),
            torch.randn(2, 5, 16, generator=g))


def test_the_widened_transformer_computes_the_same_function():
    tr = small_transformer()
    wide = widen_wan_transformer(tr).eval()
    assert wide.config.num_attention_heads == 4 and wide.config.attention_head_dim == 8
    assert wide.patch_embedding.weight.shape[0] == 32
    assert sum(p.numel() for p in wide.parameters()) > 2.5 * sum(p.numel() for p in tr.parameters())
    x, t, e = inputs()
    with torch.no_grad():
        before, after = run(tr, x, t, e), run(wide, x, t, e)
    assert before.abs().mean() > 0.1  # a real output, not a degenerate zero
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_training_pulls_the_two_copies_apart():
    """An even split would keep the duplicated channels identical under any gradient step; the random split
    does not."""
    wide = widen_wan_transformer(small_transformer()).train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    x, t, e = inputs()
    w0 = wide.patch_embedding.weight.detach().clone()
    assert torch.equal(w0[:16], w0[16:])  # the copies start equal
    run(wide, x, t, e).pow(2).mean().backward()
    opt.step()
    w1 = wide.patch_embedding.weight.detach()
    assert not torch.allclose(w1[:16], w1[16:], atol=1e-7)


def test_widening_twice_still_computes_the_same_function_and_refuses_image_models():
    tr = small_transformer(seed=3)
    wide = widen_wan_transformer(widen_wan_transformer(tr, seed=1), seed=2).eval()
    assert wide.config.num_attention_heads == 8
    x, t, e = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(wide, x, t, e), run(tr, x, t, e), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not supported"):
        widen_wan_transformer(small_transformer(qk_norm="rms_norm"))


def test_the_shipped_tiny_wan_transformer_widens_to_the_same_function():
    from diffusers import WanTransformer3DModel

    from mmeff.zoo.load_pipeline import MODELS_DIR

    tr = WanTransformer3DModel.from_pretrained(MODELS_DIR / "tiny-wan" / "transformer").eval()
    wide = widen_wan_transformer(tr).eval()
    assert wide.config.num_attention_heads == 2 * tr.config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 8, 4, 16, 16, generator=g), torch.randn(1, 48, 64, generator=g)
    with torch.no_grad():
        before, after = run(tr, x, torch.tensor([500.0]), e), run(wide, x, torch.tensor([500.0]), e)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
