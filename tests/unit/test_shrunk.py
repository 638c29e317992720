"""vitseg_lab.shrunk: the quick-scale QU options (``qu_pos="sincos"``, ``qu_skip``) against the
official QU (no position code, no skip), the 2-D sine-cosine code itself, and which scale gets
which. The official structure (no final norm, ATMSingleHead, 3 supervised masks) is pinned in
test_segvit.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitseg_lab import segvit, shrunk


class _Recorder(nn.Module):
    """Stands in for a QU decoder: remembers (queries, memory) and returns the queries."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, tgt, memory):
        self.seen.append((tgt, memory))
        return tgt


def _up(pos="none", skip=False, grid=(3, 5), dim=8):
    torch.manual_seed(0)
    up = shrunk.QueryUpsampler(in_dim=6, dim=dim, num_heads=2, grid=grid, depth=1, pos=pos,
                               skip=skip)
    up.decode_shallow, up.decode_deep = _Recorder(), _Recorder()
    return up


def test_sincos_pos_values_and_layout():
    d = 8
    pe = shrunk.sincos_pos((2, 3), d)
    assert pe.shape == (6, 8)
    omega = [1.0, 1.0 / 100]                               # 1 / 10000^(i / (d/4)), i = 0, 1
    for r in range(2):
        for c in range(3):
            want = ([math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
                    + [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega])
            torch.testing.assert_close(pe[r * 3 + c], torch.tensor(want))
    # every position distinct
    assert torch.cdist(pe, pe).add(torch.eye(6)).min() > 0.1


def test_sincos_pos_stride_2_lands_on_the_qd_positions():
    """The 1/32 token (r, c) is the QD query taken from 1/16 position (2r, 2c): same code."""
    full = shrunk.sincos_pos((5, 7), 12)
    small = shrunk.sincos_pos((3, 4), 12, stride=2)
    kept = segvit.query_downsample(full[None], (5, 7))[0]
    torch.testing.assert_close(small, kept)


def test_sincos_pos_needs_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        shrunk.sincos_pos((2, 2), 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        shrunk.QueryUpsampler(in_dim=6, dim=6, num_heads=2, grid=(2, 2), pos="sincos")
    with pytest.raises(ValueError, match="pos="):
        shrunk.QueryUpsampler(in_dim=6, dim=8, num_heads=2, grid=(2, 2), pos="learned")


def test_official_qu_has_no_position_code_and_no_skip():
    up = _up()
    shallow, deep = torch.randn(2, 15, 6), torch.randn(2, 6, 6)
    out = up(shallow, deep, (3, 5))
    torch.testing.assert_close(out, up.queries.expand(2, -1, -1))
    (q16, m16), = up.decode_shallow.seen
    (_, m32), = up.decode_deep.seen
    torch.testing.assert_close(q16, up.queries.expand(2, -1, -1))
    torch.testing.assert_close(m16, up.shallow(shallow))
    torch.testing.assert_close(m32, up.deep(deep))


def test_sincos_adds_the_code_to_queries_and_both_memories():
    up = _up(pos="sincos")
    shallow, deep = torch.randn(2, 15, 6), torch.randn(2, 6, 6)   # 3x5 grid, 2x3 at 1/32
    out = up(shallow, deep, (3, 5))
    p16, p32 = shrunk.sincos_pos((3, 5), 8), shrunk.sincos_pos((2, 3), 8, stride=2)
    torch.testing.assert_close(out, (up.queries + p16).expand(2, -1, -1))
    (_, m16), = up.decode_shallow.seen
    (_, m32), = up.decode_deep.seen
    torch.testing.assert_close(m16, up.shallow(shallow) + p16)
    torch.testing.assert_close(m32, up.deep(deep) + p32)


def test_skip_adds_the_projected_1_16_tokens_to_the_output():
    shallow, deep = torch.randn(2, 15, 6), torch.randn(2, 6, 6)
    for pos in ("none", "sincos"):
        plain, skipped = _up(pos=pos), _up(pos=pos, skip=True)
        torch.testing.assert_close(skipped(shallow, deep, (3, 5)),
                                   plain(shallow, deep, (3, 5)) + plain.shallow(shallow))


def test_quick_options_make_qu_output_depend_on_position_and_image():
    """With the real decoders at init: the skip carries each position's own content."""
    torch.manual_seed(0)
    kw = {"in_dim": 6, "dim": 8, "num_heads": 2, "grid": (4, 4), "depth": 1}
    shallow, deep = torch.randn(3, 16, 6), torch.randn(3, 4, 6)
    quick = shrunk.QueryUpsampler(**kw, pos="sincos", skip=True).eval()
    out = quick(shallow, deep, (4, 4))
    assert out.shape == (3, 16, 8)
    assert out.std(dim=1).mean() > 0.3 and out.std(dim=0).mean() > 0.3
    out.sum().backward()
    assert quick.shallow.proj.weight.grad.abs().sum() > 0
    assert quick.queries.grad.abs().sum() > 0


def test_qu_options_per_scale_and_through_build():
    q, full, large = (segvit.SegViTConfig.quick(), segvit.SegViTConfig.full(),
                      segvit.SegViTConfig.full_large())
    assert (q.qu_pos, q.qu_skip) == ("sincos", True)
    assert (full.qu_pos, full.qu_skip) == ("none", False) == (large.qu_pos, large.qu_skip)
    from dataclasses import replace

    tiny = replace(q, structure="shrunk", img_size=32, embed_dim=24, num_heads=2, depth=4,
                   decoder_dim=16, decoder_heads=2, layers_per_stage=1)
    model = segvit.build(tiny, 3)
    assert (model.upsampler.pos, model.upsampler.skip) == ("sincos", True)
    official = segvit.build(replace(tiny, qu_pos="none", qu_skip=False), 3)
    assert (official.upsampler.pos, official.upsampler.skip) == ("none", False)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.mask_logits[-1].shape == (2, 3, 4, 4)
    # another input size: the code is computed for the new grid (non-square, odd 1/32 side)
    assert model(torch.rand(1, 3, 40, 24)).mask_logits[-1].shape == (1, 3, 5, 3)
