"""Row-blocked rel-pos attention equals SDPA with the whole bias, and the encoder uses it where
the bias would not fit in the cache."""
import pytest
import torch
import torch.nn.functional as F

from sam_core.modeling import chunked_attention
from sam_core.modeling.chunked_attention import rel_pos_attention_by_rows, rows_per_block
from sam_core.modeling.image_encoder import decomposed_rel_pos_bias, decomposed_rel_pos_factors


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 7, 16, 60])
def test_equals_sdpa_with_the_materialised_bias(rows):
    generator = torch.Generator().manual_seed(0)
    hw = (6, 10)
    q, k, v = (torch.randn(2, 3, 60, 8, generator=generator) for _ in range(3))
    rel_h, rel_w = torch.randn(11, 8, generator=generator), torch.randn(19, 8, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=decomposed_rel_pos_bias(q, rel_h, rel_w, hw, hw))
    bias_h, bias_w = decomposed_rel_pos_factors(q, rel_h, rel_w, hw, hw)
    torch.testing.assert_close(rel_pos_attention_by_rows(q, k, v, bias_h, bias_w, rows), expected, rtol=1e-5, atol=1e-5)


def test_rows_follow_the_cache(monkeypatch):
    monkeypatch.setattr(chunked_attention, "last_level_cache_bytes", lambda: 32 << 20)
    assert rows_per_block(1, 12, 4096, 4) == 64  # ViT-B global block, fp32: 16 MiB of scores
    assert rows_per_block(1, 12, 4096, 2) == 128
    assert rows_per_block(4, 12, 4096, 4) == 16  # an encoder batch of 4 shares the same budget
    assert rows_per_block(25, 12, 196, 4) is None  # a 14x14 window's scores fit whole: SDPA


@torch.no_grad()
def test_encoder_blocks_rows_when_the_cache_is_small(monkeypatch):
    # A cache small enough that the tiny encoder's global block (2 heads x 256 x 256) is split.
    from sam_core import build_sam
    from tests.sam_factory import perturb_parameters, tiny_config

    model = perturb_parameters(build_sam(tiny_config()), seed=3)
    x = torch.randn(1, 3, 256, 256)
    whole = model.image_encoder(x)
    calls = []
    original = chunked_attention.rel_pos_attention_by_rows
    monkeypatch.setattr(chunked_attention, "last_level_cache_bytes", lambda: 2 * 2 * 256 * 4 * 32)
    monkeypatch.setattr(
        "sam_core.modeling.image_encoder.rel_pos_attention_by_rows",
        lambda *args: calls.append(args[-1]) or original(*args),
    )
    blocked = model.image_encoder(x)
    assert calls and all(rows < 256 for rows in calls)
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=1e-4)
