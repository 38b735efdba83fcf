"""`pack_mask`, the kernels' bit-packed tree mask: bit j % 32 of int32 word j // 32 of row t is
mask[t, j], padding bits zero. Checked bit by bit against the definition, for the numpy path
(CPU tensors) and the torch-ops path (other devices) alike."""
from __future__ import annotations

import pytest
import torch

from msd_engine.kv_cache import _pack_mask_torch, pack_mask


@pytest.mark.parametrize("t, r", [(1, 1), (3, 31), (4, 32), (5, 33), (8, 64), (7, 100), (16, 129)])
def test_bits_follow_the_definition(t, r):
    mask = torch.rand(t, r, generator=torch.Generator().manual_seed(r)) < 0.5
    mask[0, -1] = True  # the top bit of a full word makes the int32 negative
    words = (r + 31) // 32
    for packed in (pack_mask(mask), _pack_mask_torch(mask, words)):
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (t, words)
        unsigned = packed.to(torch.int64) & 0xFFFFFFFF
        for j in range(words * 32):
            bit = (unsigned[:, j // 32] >> (j % 32)) & 1
            expected = mask[:, j].to(torch.int64) if j < r else torch.zeros(t, dtype=torch.int64)
            assert torch.equal(bit, expected), (t, r, j)


def test_rejects_what_is_not_a_2d_bool_mask():
    with pytest.raises(ValueError, match="2-D bool"):
        pack_mask(torch.ones(3, 4))
    with pytest.raises(ValueError, match="2-D bool"):
        pack_mask(torch.ones(3, dtype=torch.bool))
