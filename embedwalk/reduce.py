"""Accurate reductions over the vocabulary.

A float32 dot product over ~50k entries done by BLAS in one go loses about 5e-4 nats on an
entropy or a KL (its running sums grow large while the terms stay small). Here the products
are summed in float32 over blocks of 2048 entries (torch's vectorised cascade sum) and the
block sums are added in float64, which brings the error to the float32 rounding of the inputs
themselves (~1e-5 nats on SmolLM2's 49k vocabulary) in three kernel calls, whatever the size.

:class:`VocabAccumulator` gives every per-row statistic the logit lens needs (log-normaliser,
entropy, target rank, a cross term against a reference distribution, top-k) from logits seen
one vocabulary block at a time, so a block can be reduced while it is still in cache right
after its GEMM and the full ``[rows, vocab]`` logits never exist. Each block is reduced either
eagerly (a handful of passes, scratch buffers reused) or by one kernel compiled by
``torch.compile`` (:func:`fused_available`); the running sums are merged in float64 with the
rescaling of a streaming softmax. Both paths are tested equal to a float64 recomputation.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = ["rowdot", "VocabStats", "VocabAccumulator", "vocab_stats", "block_sums", "fused_available"]

_BLOCK = 2048


def rowdot(a: Tensor, b: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Row-wise dot products ``[..., n] x [..., n] -> [...]`` in float64 (``b`` may broadcast
    against ``a``).

    ``out``: an optional scratch tensor of ``a``'s shape for the products (reused across calls
    to avoid a fresh allocation; it may be ``a`` itself); otherwise one is allocated."""
    prod = torch.mul(a, b, out=out) if out is not None else a * b
    return _blocksum(prod)


def _blocksum(x: Tensor) -> Tensor:
    n = x.shape[-1]
    full = n - n % _BLOCK
    lead = x.shape[:-1]
    total = x[..., :full].reshape(*lead, full // _BLOCK, _BLOCK).sum(-1).double().sum(-1)
    if full < n:
        total += x[..., full:].sum(-1).double()
    return total


class VocabStats(NamedTuple):
    """Per-row statistics of logits ``z`` (each ``[...]``, the leading shape of ``z``).

    ``log_norm``: log sum exp z (float64); ``entropy``: H(softmax z) in nats (float64);
    ``above``: the number of entries strictly above the row's target logit (int64), i.e. the
    target's 0-based rank; ``cross``: sum_v q_v z_v against a reference distribution ``q``
    (float64), from which KL(q || softmax z) = sum q log q - cross + log_norm * sum q."""

    log_norm: Tensor
    entropy: Tensor
    above: Tensor
    cross: Tensor


def vocab_stats(
    z: Tensor, z_max: Tensor, z_target: Tensor, q: Tensor, *, fused: bool = False, scratch=None
) -> VocabStats:
    """Statistics of logits ``z`` ``[m, n, vocab]`` (float32 or float64) against targets and a
    reference distribution, with float64 sums (one block of :class:`VocabAccumulator`).

    Args:
        z_max: ``[m, n]`` the row maxima of ``z`` (top-k gives them for free).
        z_target: ``[m, n]`` the logit of each row's target.
        q: ``[n, vocab]`` a reference distribution per position (broadcast over ``m``).
        fused: one compiled kernel (:func:`fused_available` must be true) instead of the eager
            passes.
        scratch: an object with ``get(name, shape, dtype, device)`` lending reusable buffers
            to the eager path.

    The two paths agree to float32 rounding of the inputs (tests/test_reduce.py checks both
    against a float64 recomputation).
    """
    s, ez, above, cross = block_sums(z, z_max, z_target, q, fused=fused, scratch=scratch)
    log_s = torch.log(s)
    return VocabStats(z_max.double() + log_s, log_s - ez / s, above.long(), cross)


def block_sums(z, z_max, z_target, q, *, fused=False, scratch=None):
    """``(sum e, sum e (z - z_max), #(z > z_target), sum q z)`` per row of ``z`` with
    ``e = exp(z - z_max)``: float64, float64, int, float64."""
    if fused:
        return _compiled()(z, z_max, z_target, q)
    return _eager(z, z_max, z_target, q, scratch or _Fresh())


class VocabAccumulator:
    """:class:`VocabStats` of ``rows`` logit rows seen a vocabulary block at a time
    (``update``), plus the running top-k; ``result()`` gives the statistics and
    ``(top values [rows, k], top ids [rows, k])``.

    The blocks are merged online in float64: with running maximum M, S = sum exp(z - M) and
    EZ = sum exp(z - M)(z - M), a block with maximum m rescales them to M' = max(M, m) by
    ``S' = e^(M-M') S + e^(m-M') s`` and ``EZ' = e^(M-M') (EZ + (M-M') S) + e^(m-M') (ez + (m-M') s)``
    (the online softmax normaliser of Milakov & Gimelshein, 2018, extended to the entropy's
    term); then log Z = M + log S and H = log S - EZ / S, in nats."""

    def __init__(self, top_k: int, *, fused: bool = False, scratch=None):
        self.top_k, self.fused, self.scratch = top_k, fused, scratch or _Fresh()
        self.M = None

    def update(self, z: Tensor, j0: int, z_target: Tensor, q: Tensor, m: int) -> None:
        """``z`` ``[m * n, w]``: logits of vocabulary entries ``j0 : j0 + w`` (readout-major
        rows); ``z_target`` ``[m * n]``; ``q`` ``[n, w]`` the reference distribution's block."""
        rows, w = z.shape
        v, i = z.topk(min(self.top_k, w), -1)
        mb = v[:, 0]
        if self.M is None:
            self.top_v, self.top_i = v, i + j0
        else:
            self.top_v, k = torch.cat([self.top_v, v], 1).topk(min(self.top_k, self.top_v.shape[1] + w), -1)
            self.top_i = torch.cat([self.top_i, i + j0], 1).gather(1, k)
        s, ez, above, cross = block_sums(
            z.view(m, rows // m, w), mb.view(m, -1), z_target.view(m, -1), q,
            fused=self.fused, scratch=self.scratch,
        )
        s, ez, above, cross = (t.reshape(rows) for t in (s, ez, above, cross))
        mb = mb.double()
        if self.M is None:
            self.M, self.S, self.EZ, self.above, self.cross = mb, s, ez, above.long(), cross
            return
        M = torch.maximum(self.M, mb)
        a, b = torch.exp(self.M - M), torch.exp(mb - M)
        self.EZ = a * (self.EZ + (self.M - M) * self.S) + b * (ez + (mb - M) * s)
        self.S = a * self.S + b * s
        self.M = M
        self.above += above
        self.cross += cross

    def result(self) -> tuple[VocabStats, Tensor, Tensor]:
        log_s = torch.log(self.S)
        stats = VocabStats(self.M + log_s, log_s - self.EZ / self.S, self.above, self.cross)
        return stats, self.top_v, self.top_i


def _eager(z, z_max, z_target, q, bufs):
    d = torch.sub(z, z_max[..., None], out=bufs.get("d", z.shape, z.dtype, z.device))
    e = torch.exp(d, out=bufs.get("e", z.shape, z.dtype, z.device))
    s = _blocksum(e)
    ez = rowdot(e, d, out=d)  # exp(z - max) . (z - max): the entropy's mean-logit term
    # A float 0/1 mask sums ~4x faster than a bool one; counts stay exact below 2**24.
    above = torch.gt(z, z_target[..., None], out=e).sum(-1).long()
    cross = rowdot(z, q, out=d)
    return s, ez, above, cross


def _formula(z, z_max, z_target, q):
    d = z - z_max[..., None]
    e = torch.exp(d)
    s = e.sum(-1, dtype=torch.float64)
    ez = (e * d).sum(-1, dtype=torch.float64)
    above = (z > z_target[..., None]).sum(-1, dtype=torch.int64)
    cross = (z * q).sum(-1, dtype=torch.float64)
    return s, ez, above, cross


class _Fresh:
    def get(self, name, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------- the fused kernel
_COMPILED = None
_UNAVAILABLE: dict[str, str] = {}  # device type -> why the fused kernel cannot be used there


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_formula, dynamic=True, fullgraph=True)
    return _COMPILED


def fused_available(device, *, require: bool = False) -> bool:
    """Whether the fused kernel compiles and runs on ``device``'s type (tried once per process,
    on a small input, and checked equal to the eager path).

    Set ``EMBEDWALK_FUSED=0`` to never try. With ``require=True`` a failure raises
    :class:`EmbedwalkError` naming the reason (for an explicit ``fused=True``)."""
    kind = torch.device(device).type
    if os.environ.get("EMBEDWALK_FUSED", "") == "0":
        _UNAVAILABLE.setdefault(kind, "EMBEDWALK_FUSED=0 is set")
    if kind not in _UNAVAILABLE and kind not in _CHECKED:
        try:
            _self_check(torch.device(device))
            _CHECKED.add(kind)
        except Exception as err:  # no C++ compiler, no triton, an unsupported backend: use eager
            _UNAVAILABLE[kind] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if kind in _UNAVAILABLE and require:
        raise EmbedwalkError(
            f"fused=True, but the fused reduction kernel is not available on {kind} here "
            f"({_UNAVAILABLE[kind]}); pass fused=False (same numbers, eager passes) or fused=None"
        )
    return kind not in _UNAVAILABLE


_CHECKED: set[str] = set()


def _self_check(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(2, 3, 4099, generator=g) * 4).to(device)
    q = torch.softmax(torch.randn(3, 4099, generator=g), -1).to(device)
    zt = z[..., 5].clone()
    zm = z.amax(-1)
    got = vocab_stats(z, zm, zt, q, fused=True)
    want = vocab_stats(z, zm, zt, q, fused=False)
    for a, b, name in zip(got, want, VocabStats._fields):
        if not torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6):
            raise RuntimeError(f"the compiled kernel's {name} differs from the eager one by "
                               f"{float((a.double() - b.double()).abs().max()):.2e}")
