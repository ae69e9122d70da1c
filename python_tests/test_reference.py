"""The reference against brute force: the yardstick must itself be right."""
import math

import pytest
import torch
from layouts import random_layout

from aspd_kernels import reference as R


def brute_visible(seg, br, q, k):
    return k <= q and (seg[k] != seg[q] or br[k] == br[q])


@pytest.mark.parametrize("seed", range(6))
def test_dense_mask_matches_pair_loop(seed):
    seg, br = random_layout(seed, max_tokens=90)
    mask = R.dense_mask(seg, br)
    s, b = seg.tolist(), br.tolist()
    n = len(s)
    expect = torch.tensor([[brute_visible(s, b, q, k) for k in range(n)] for q in range(n)])
    assert torch.equal(mask, expect)


def test_dense_mask_hand_example():
    # P P A A B B S  (the docstring picture of branch_attention)
    seg = torch.tensor([0, 0, 1, 1, 1, 1, 2], dtype=torch.int32)
    br = torch.tensor([0, 0, 1, 1, 2, 2, 0], dtype=torch.int32)
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(R.dense_mask(seg, br), expect)


@pytest.mark.parametrize("seed", range(3))
def test_attention_dense_matches_pair_loop(seed):
    seg, br = random_layout(seed, max_tokens=40)
    n, h, d = seg.numel(), 2, 8
    q, k, v = (torch.randn(n, h, d, dtype=torch.float64) for _ in range(3))
    scale = 1 / math.sqrt(d)
    out, lse = R.attention_dense(q, k, v, seg, br, torch.arange(n), scale)
    s, b = seg.tolist(), br.tolist()
    for i in range(n):
        keys = [j for j in range(n) if brute_visible(s, b, i, j)]
        for hh in range(h):
            scores = torch.stack([q[i, hh] @ k[j, hh] * scale for j in keys])
            p = torch.softmax(scores, 0)
            expect = sum(p[t] * v[j, hh] for t, j in enumerate(keys))
            torch.testing.assert_close(out[i, hh], expect)
            torch.testing.assert_close(lse[hh, i].double(), torch.logsumexp(scores, 0), atol=1e-6, rtol=1e-6)
