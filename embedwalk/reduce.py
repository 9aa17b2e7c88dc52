"""Accurate reductions over the vocabulary.

A float32 dot product over ~50k entries done by BLAS in one go loses about 5e-4 nats on an
entropy or a KL (its partial sums grow large while the terms stay small). Blocks of 2048
entries are summed in float32 by the same batched kernel and the block sums are added in
float64, which brings the error to the float32 rounding of the inputs themselves (~1e-5 nats
on SmolLM2's 49k vocabulary) at the same speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rowdot"]

_BLOCK = 2048


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products ``[rows, n] x [rows, n] -> [rows]`` in float64, accumulated in
    float32 blocks of 2048 entries and float64 across blocks; no ``[rows, n]`` temporary."""
    rows, n = a.shape
    out = torch.zeros(rows, dtype=torch.float64, device=a.device)
    for v0 in range(0, n, _BLOCK):
        blk_a, blk_b = a[:, v0 : v0 + _BLOCK], b[:, v0 : v0 + _BLOCK]
        out += torch.bmm(blk_a.unsqueeze(1), blk_b.unsqueeze(2)).reshape(rows).double()
    return out
