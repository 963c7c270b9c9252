"""Function-preserving growth of a Wan transformer (mmeff.zoo.grow_transformer)."""
from __future__ import annotations

import pytest
import torch

from mmeff.zoo.grow_transformer import (
    arch_of,
    grow_wan_transformer,
    old_block_positions,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    with torch.no_grad():  # a "trained" model: no zero output projections anywhere
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tr.eval()


def run(tr, x, t, e):
    with torch.no_grad():
        return tr(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]


def test_the_grown_transformer_computes_the_same_function():
    tr = small_transformer()
    grown = grow_wan_transformer(tr, num_layers=7, ffn_dim=80).eval()
    heads = tr.config.num_attention_heads  # kept: growing changes depth and FFN width only
    assert arch_of(grown) == {"num_layers": 7, "ffn_dim": 80, "num_attention_heads": heads} and len(grown.blocks) == 7
    torch.manual_seed(1)
    x, t, e = torch.randn(2, 4, 3, 8, 8), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 16)
    before, after = run(tr, x, t, e), run(grown, x, t, e)
    assert before.abs().mean() > 0.1
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    # a plain deepening without zeroed residual outputs would not keep it
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    naive = WanTransformer3DModel(**{k: v for k, v in grown.config.items() if not k.startswith("_")}).eval()
    naive.load_state_dict(grown.state_dict())
    torch.nn.init.normal_(naive.blocks[1].attn1.to_out[0].weight, std=0.1)
    assert (run(naive, x, t, e) - before).abs().max() > 1e-3


def test_old_blocks_keep_their_weights_and_new_parts_train():
    tr = small_transformer()
    grown = grow_wan_transformer(tr, num_layers=6, ffn_dim=48)
    positions = old_block_positions(3, 6)
    assert positions == [0, 2, 4]
    for i, pos in enumerate(positions):
        assert torch.equal(grown.blocks[pos].attn1.to_q.weight, tr.blocks[i].attn1.to_q.weight)
        assert torch.equal(grown.blocks[pos].ffn.net[2].weight[:, :32], tr.blocks[i].ffn.net[2].weight)
        assert torch.count_nonzero(grown.blocks[pos].ffn.net[2].weight[:, 32:]) == 0
    assert torch.equal(grown.proj_out.weight, tr.proj_out.weight)
    new = grown.blocks[1]
    assert torch.count_nonzero(new.attn1.to_out[0].weight) == 0 and torch.count_nonzero(new.ffn.net[2].weight) == 0
    grown.train()
    x, t, e = torch.randn(2, 4, 3, 8, 8), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 16)
    grown(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0].pow(2).mean().backward()
    for lin in (new.attn1.to_out[0], new.attn2.to_out[0], new.ffn.net[2], grown.blocks[0].ffn.net[2]):
        assert lin.weight.grad.abs().sum() > 0  # zero-initialised outputs are not stuck


def test_growth_refuses_to_shrink():
    tr = small_transformer()
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_wan_transformer(tr, num_layers=2, ffn_dim=32)
    with pytest.raises(ValueError, match="cannot narrow"):
        grow_wan_transformer(tr, num_layers=3, ffn_dim=16)
