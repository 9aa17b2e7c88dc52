"""Accurate reductions over the vocabulary.

A float32 dot product over ~50k entries done by BLAS in one go loses about 5e-4 nats on an
entropy or a KL (its running sums grow large while the terms stay small). Here the products
are summed in float32 over blocks of 2048 entries (torch's vectorised cascade sum) and the
block sums are added in float64, which brings the error to the float32 rounding of the inputs
themselves (~1e-5 nats on SmolLM2's 49k vocabulary) in three kernel calls, whatever the size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["rowdot"]

_BLOCK = 2048


def rowdot(a: Tensor, b: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Row-wise dot products ``[rows, n] x [rows, n] -> [rows]`` in float64.

    ``out``: an optional ``[rows, n]`` scratch tensor for the products (reused across calls
    to avoid a fresh allocation); otherwise one is allocated."""
    rows, n = a.shape
    prod = torch.mul(a, b, out=out) if out is not None else a * b
    full = n - n % _BLOCK
    total = prod[:, :full].reshape(rows, full // _BLOCK, _BLOCK).sum(-1).double().sum(-1)
    if full < n:
        total += prod[:, full:].sum(-1).double()
    return total
