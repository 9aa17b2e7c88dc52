"""Tolerances derived from floating-point rounding, for comparing embedwalk with the model itself.

Two correct computations of the same quantity differ only in the order and grouping of their
floating-point operations: another BLAS kernel or thread count, a row-blocked GEMM, the
model's fused path against ours. What they may differ by follows from the precision and the
magnitudes involved, so every tolerance here is computed from those, never picked by hand
(a hand-picked ``1e-5`` passed on one CPU and failed on another).

**Dot products.** A length-``n`` dot product in a precision with unit roundoff ``u`` has the
worst-case error ``gamma_n * S``, ``gamma_n = n u / (1 - n u)``, ``S = sum_i |x_i y_i|``
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5). That bound
assumes every rounding error has the same sign; with round-to-nearest they behave as
independent zero-mean errors, and the error stays below ``lam * sqrt(n) * u * S`` with
probability at least ``1 - 2 exp(-lam**2 (1 - u)**2 / 2)`` (Higham & Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 3.1).
``LAM = 8`` makes that failure probability 2.5e-14 per entry, negligible over the ~1e8 entries
a test suite compares. Two computations each carry such an error, hence the factor 2.

**Readout.** ``logits = transform(norm(x) @ W_U + b_U)``. The norm's statistic is a mean over
``d_model`` squares (the same bound, relative to ``|norm(x)|``), and the GEMM is a dot product
over ``d_model`` terms: ``sqrt(d)`` twice, against ``S_j = sum_i |norm(x)_i W_U[i, j]| + |b_j|``.
An output transform multiplies that by at most ``max(1, |scale|)`` (a soft-cap's slope is
below 1). **Log-probs** ``z_j - logsumexp(z)``: the log-normaliser moves with the largest logit
error and adds the rounding of a sum of ``d_vocab`` terms in ``[0, 1]`` whose total is at least
1 (``lam sqrt(V) u``, absolute, after the log), plus one rounding of the result.

A wrong implementation is not near these numbers: a final norm applied with another vector's
cached scale, a skipped soft-cap or scale, or a readout one block off differ by 0.1 to 100
nats (``tests/test_adapter.py::test_tolerance_still_catches_a_wrong_readout`` checks the
margin on SmolLM2).
"""

from __future__ import annotations

import math

import torch

LAM = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the machine epsilon (2**-24 for float32, 2**-8 for bfloat16)."""
    return torch.finfo(dtype).eps / 2


def dot_tol(scale, n: int, dtype: torch.dtype = torch.float32, computations: int = 2):
    """Largest ``|a - b|`` between ``computations`` correct float computations of a length-``n``
    dot product whose terms' absolute values sum to ``scale`` (a float or a tensor)."""
    return computations * LAM * math.sqrt(n) * unit_roundoff(dtype) * scale


def logit_scale(adapter, resid: torch.Tensor) -> float:
    """``max_j S_j``, ``S_j = sum_i |norm(x)_i W_U[i, j]| + |b_j|``, times the output transform's
    largest slope: what the logits' rounding (and their response to a relative change of the
    normed residual) is proportional to. ``resid``: ``[..., d_model]``."""
    with torch.no_grad():
        normed = adapter.final_norm(resid.reshape(-1, resid.shape[-1])).double().abs()
        scale = normed @ adapter.W_U.double().abs()
        if adapter.b_U is not None:
            scale = scale + adapter.b_U.double().abs()
    return max(1.0, abs(adapter.output_scale or 1.0)) * float(scale.max())


def logit_tol(adapter, resid: torch.Tensor) -> float:
    """Largest ``|a - b|`` over the logits of ``adapter.readout(resid)`` between two correct
    computations (see the module docstring). ``resid``: ``[..., d_model]``."""
    # The norm's statistic and the GEMM each contribute sqrt(d_model) u of S.
    return 2 * float(dot_tol(logit_scale(adapter, resid), adapter.d_model, adapter.dtype))


def logprob_tol(adapter, resid: torch.Tensor, logprobs: torch.Tensor | None = None, *, resid_rel: float = 0.0) -> float:
    """Largest ``|a - b|`` over the log-probs of the readout of ``resid`` between two correct
    computations: twice the logit tolerance (the entry and the log-normaliser), the rounding of
    the normaliser's sum over ``d_vocab`` terms, and one rounding of ``|log p|``.

    ``resid_rel``: when the two computations also read residuals that differ by up to
    ``resid_rel`` times the residual's largest entry (two forward passes, see
    :func:`resid_tol`), the normed residual moves by up to twice that relative amount (its
    statistic moves too) and each logit by that times ``S`` (:func:`logit_scale`), the entry
    and the log-normaliser alike."""
    u = unit_roundoff(adapter.dtype)
    big = 0.0 if logprobs is None else float(logprobs.detach().abs().max())
    vocab = 2 * LAM * math.sqrt(adapter.d_vocab) * u
    moved = 2 * 2 * resid_rel * logit_scale(adapter, resid) if resid_rel else 0.0
    return 2 * logit_tol(adapter, resid) + vocab + 2 * LAM * u * big + moved


def relative_tol(n: int, dtype: torch.dtype = torch.float32, depth: int = 1) -> float:
    """A relative tolerance for a quantity built by ``depth`` rounds of length-``n`` dot products
    (a residual stream after ``depth`` sublayers, say), each of which may round differently in
    the two computations: ``depth * dot_tol(1, n)``. Compare ``|a - b|.max() / |b|.max()``."""
    return depth * float(dot_tol(1.0, n, dtype))


def entropy_tol(tol_lp: float, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row tolerance of an entropy ``H = -sum p log p`` whose log-probs are within ``tol_lp``:
    ``dH = -sum p (1 + log p) d(log p)``, so ``|dH| <= tol_lp (1 + H)``. ``logprobs``: the
    float64 reference, ``[..., vocab]``."""
    lp = logprobs.double()
    return tol_lp * (1 - (lp.exp() * lp).sum(-1))


def kl_tol(tol_lp: float, final_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row tolerance of ``KL(p_f || q) = sum p_f (log p_f - log q)`` when both log-probs are
    within ``tol_lp``: ``|dKL| <= tol_lp (2 + sum p_f |log p_f - log q|)``. Early readouts of a
    real model have KLs of ~100 nats, whose tolerance grows with them."""
    f, q = final_logprobs.double(), logprobs.double()
    return tol_lp * (2 + (f.exp() * (f - q).abs()).sum(-1))


def resid_rel(adapter) -> float:
    """:func:`resid_tol` relative to the residual's largest entry."""
    cfg = adapter.cfg
    n = max(adapter.d_model, int(getattr(cfg, "d_mlp", None) or 4 * adapter.d_model))
    return (2 * adapter.n_layers + 1) * float(dot_tol(1.0, n, adapter.dtype))


def resid_tol(adapter, x: torch.Tensor) -> float:
    """Largest ``|a - b|`` over residual vectors ``x`` computed by two forward passes that round
    differently (another batch shape, padding, row blocking): each of the ``2 n_layers + 1``
    sublayers and embeddings adds the rounding of dot products of at most
    ``n = max(d_model, d_mlp)`` terms, bounded relative to the residual's largest entry (the
    terms of a residual sum are no larger than the residual in these models; a model whose
    sublayers cancel far larger terms would need its own bound)."""
    return resid_rel(adapter) * float(x.detach().abs().max())


def forward_tols(adapter, final_resid: torch.Tensor, logprobs: torch.Tensor, other: torch.Tensor | None = None,
                 *, rel: float | None = None) -> dict:
    """Tolerances of the metrics of a (possibly edited) forward pass, against another correct
    computation of the same forward (another batching, a resumed pass, another route through
    the same attention), from that forward's own magnitudes: ``final_resid`` ``[rows, d_model]``
    and its float64 log-probs ``[rows, vocab]``; ``other``: the log-probs a KL compares them
    with. ``rel``: the residuals' relative difference (default :func:`resid_rel`).

    ``logit``: :func:`logit_tol` plus the residual moved by ``rel`` (each logit by ``2 rel S``);
    ``logprob``/``loss``: :func:`logprob_tol` with the residual moved by ``rel``; a difference
    of two losses twice that; ``kl``: :func:`kl_tol`'s largest row; ``cosine`` of two final
    residuals: each moves by ``sqrt(d) rel`` of its norm at most, and a float32 cosine rounds
    by three dot products."""
    rel = resid_rel(adapter) if rel is None else rel
    lp = logprob_tol(adapter, final_resid, logprobs, resid_rel=rel)
    out = {"logit": logit_tol(adapter, final_resid) + 2 * rel * logit_scale(adapter, final_resid),
           "logprob": lp, "loss": lp, "delta_loss": 2 * lp,
           "cosine": 2 * math.sqrt(adapter.d_model) * rel + 3 * float(dot_tol(1.0, adapter.d_model))}
    if other is not None:
        out["kl"] = float(kl_tol(lp, logprobs, other).max())
    return out


def run_tols(model, tokens: torch.Tensor, mask: torch.Tensor, writers=(), other: torch.Tensor | None = None) -> dict:
    """:func:`forward_tols` of the forward of ``model`` on ``tokens`` (``mask`` True on real
    tokens) under ``writers``, from that forward's own final residuals and log-probs at the real
    positions; ``other``: log-probs ``[batch, pos, vocab]`` a KL compares them with."""
    import embedwalk as ew

    finals, logits = [], []

    class Final(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.final_resid_hook]

        def read(self, name, value, ctx):
            finals.append(value.detach().clone())

    ew.run(model, tokens, attention_mask=mask, readers=[Final()], writers=list(writers),
           on_logits=lambda lg, ctx: logits.append(lg.detach()))
    resid, lp = torch.cat(finals)[mask], torch.cat(logits).double().log_softmax(-1)[mask]
    return forward_tols(ew.adapt(model), resid, lp, None if other is None else other[mask].double())
