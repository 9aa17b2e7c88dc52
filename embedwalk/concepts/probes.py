"""Linear probes for categorical concepts.

* :func:`fit_mass_mean_probe` -- nearest class mean (for two classes: the
  "mass-mean" direction μ₁ - μ₀ with the threshold half way), from
  :class:`~embedwalk.concepts.stats.ClassStats`.
* :func:`fit_lda_probe` -- shared within-class covariance with shrinkage towards
  a scaled identity, also from ``ClassStats``; identical to scikit-learn's
  ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage=γ)``.
* :func:`fit_logistic_probe` -- multinomial logistic regression with an L2
  penalty, optimised by full-batch L-BFGS whose every loss evaluation streams
  over an iterable of batches (so it can re-read an activation store).
* :func:`cross_validate_probe` -- held-out accuracy over group folds for any of
  the three.

Batches are tuples ``(x [n, p], labels [n])`` or ``(x, labels, groups)``;
``batches`` must be re-iterable (a list, or an object whose ``__iter__`` starts
over) or a zero-argument callable returning a fresh iterator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.errors import EmbedwalkError
from .fitted import check_same, describe_identity, identity_of
from .stats import (
    ACC,
    FORMAT_VERSION,
    ClassStats,
    FoldedStats,
    _as_tensor,
    group_folds,
    load_tensors,
    save_tensors,
)

__all__ = [
    "ClassStats",
    "LinearProbe",
    "ProbeCV",
    "fit_mass_mean_probe",
    "fit_lda_probe",
    "fit_logistic_probe",
    "cross_validate_probe",
]

Batches = Iterable[tuple] | Callable[[], Iterable[tuple]]


def _passes(batches: Batches) -> Callable[[], Iterable[tuple]]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches
    if iter(batches) is batches:
        raise TypeError(
            "batches is a one-shot iterator but probes read the data several times; "
            "pass a list, a re-iterable store, or a callable returning a fresh iterator"
        )
    return lambda: iter(batches)


def _unpack(batch) -> tuple[Tensor, Tensor, Any]:
    if len(batch) == 2:
        x, y = batch
        g = None
    else:
        x, y, g = batch[:3]
    return _as_tensor(x), _as_tensor(y).reshape(-1).long(), g


# --------------------------------------------------------------------------- result


@summary_repr
@dataclass
class LinearProbe:
    """``logits = x @ weight.T + bias``; ``predict`` is the arg-max class.

    ``fitted_in`` is the model and residual basis the probe was fitted on
    (:mod:`embedwalk.concepts.fitted`; None: unknown, e.g. fitted from plain tensors or loaded
    from an older file). ``logits``/``predict``/``accuracy`` take ``source=`` (the model or
    store ``x`` comes from) and then refuse activations of another model or basis.
    """

    weight: Float[Tensor, "c p"]
    bias: Float[Tensor, " c"]
    kind: str
    class_names: list[str] | None = None
    counts: Float[Tensor, " c"] | None = None
    meta: dict = field(default_factory=dict)
    fitted_in: dict | None = None
    _repr_skip = ("fitted_in",)  # the headline names it

    def _headline(self) -> list[str]:
        return [f"{self.kind} probe: {self.n_features} features -> {self.n_classes} classes, "
                f"fitted on {describe_identity(self.fitted_in)}"]

    def check_compatible(self, model_or_store) -> None:
        """Raise EmbedwalkError if ``model_or_store`` is another model or residual basis than
        the one this probe was fitted on (a probe of unknown origin passes)."""
        check_same(self.fitted_in, model_or_store, "this LinearProbe", "applied to activations of")

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def n_features(self) -> int:
        return self.weight.shape[1]

    @property
    def direction(self) -> Float[Tensor, " p"]:
        """For two classes, the vector whose dot product separates them (class 1 - class 0)."""
        if self.n_classes != 2:
            raise EmbedwalkError("direction is defined for two-class probes; this probe has "
                                 f"{self.n_classes} classes: use .weight for one direction per class")
        return self.weight[1] - self.weight[0]

    def logits(self, x: Float[Tensor, "n p"], *, source=None) -> Float[Tensor, "n c"]:
        if source is not None:
            self.check_compatible(source)
        x = _as_tensor(x).to(device=self.weight.device, dtype=self.weight.dtype)
        return x @ self.weight.T + self.bias

    def predict(self, x: Float[Tensor, "n p"], *, source=None) -> Int[Tensor, " n"]:
        return self.logits(x, source=source).argmax(-1)

    def accuracy(self, x: Float[Tensor, "n p"], labels: Int[Tensor, " n"], *, source=None) -> float:
        y = _as_tensor(labels).reshape(-1).to(self.weight.device)
        return (self.predict(x, source=source) == y).to(ACC).mean().item()

    def to_dataframe(self) -> pd.DataFrame:
        """One row per class: training count, weight norm and bias."""
        names = self.class_names or [str(c) for c in range(self.n_classes)]
        return pd.DataFrame({
            "probe": self.kind,
            "class": names,
            "n_train": None if self.counts is None else self.counts.cpu().numpy(),
            "weight_norm": self.weight.norm(dim=1).cpu().numpy(),
            "bias": self.bias.cpu().numpy(),
        })

    def save(self, path: str | Path) -> None:
        t = {"weight": self.weight, "bias": self.bias}
        if self.counts is not None:
            t["counts"] = self.counts
        save_tensors(path, t, {"class": "LinearProbe", "format_version": FORMAT_VERSION,
                               "kind": self.kind, "class_names": self.class_names,
                               "meta": self.meta, "fitted_in": self.fitted_in})

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        t, m = load_tensors(path)
        if m.get("class") != "LinearProbe":
            raise EmbedwalkError(f"{path} holds {m.get('class')!r}, not a LinearProbe")
        return cls(t["weight"], t["bias"], m["kind"], m["class_names"], t.get("counts"), m["meta"],
                   m.get("fitted_in"))


# --------------------------------------------------------------------------- from statistics


def _log_priors(stats: ClassStats) -> Tensor:
    return torch.log(stats.priors)  # -inf for an unseen class: never predicted


def fit_mass_mean_probe(stats: ClassStats, *, use_priors: bool = False) -> LinearProbe:
    """Nearest class mean: ``logit_c = μ_c·x - ½‖μ_c‖² (+ log π_c)``.

    For two classes the decision is ``(μ₁ - μ₀)·x > ½(‖μ₁‖² - ‖μ₀‖²)``: the
    mass-mean probe direction with its threshold mid-way between the means.
    """
    mu = stats.means
    bias = -0.5 * (mu * mu).sum(1)
    bias = torch.where(stats.counts > 0, bias, torch.full_like(bias, -math.inf))
    if use_priors:
        bias = bias + _log_priors(stats)
    return LinearProbe(mu.clone(), bias, "mass_mean", stats.class_names, stats.counts.clone(),
                       {"use_priors": use_priors}, stats.fitted_in)


def fit_lda_probe(stats: ClassStats, *, shrinkage: float = 0.1) -> LinearProbe:
    """Linear discriminant analysis with covariance shrinkage.

    ``Σ = (1-γ) Sw/n + γ (tr(Sw/n)/p) I``, ``w_c = Σ⁻¹ μ_c``,
    ``b_c = -½ μ_c·w_c + log π_c``.  Shrinking towards the average variance
    keeps Σ invertible when p is large next to n, as it is for residual streams.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise EmbedwalkError(f"shrinkage must lie in [0, 1] (0: the pooled covariance, 1: the average variance times the identity), got {shrinkage!r}")
    cov = stats.within_cov(ddof=0)
    p = cov.shape[0]
    target = cov.diagonal().sum() / p
    cov = (1 - shrinkage) * cov + shrinkage * target * torch.eye(p, dtype=ACC, device=cov.device)
    rhs = stats.means.T
    if shrinkage > 0:
        w = torch.linalg.solve(cov, rhs)
    else:  # possibly singular: minimum-norm least squares, as scikit-learn's lsqr solver
        w = torch.linalg.lstsq(cov.cpu(), rhs.cpu(), driver="gelsd").solution.to(cov.device)
    weight = w.T.contiguous()
    bias = -0.5 * (stats.means * weight).sum(1) + _log_priors(stats)
    return LinearProbe(weight, bias, "lda", stats.class_names, stats.counts.clone(),
                       {"shrinkage": shrinkage}, stats.fitted_in)


# --------------------------------------------------------------------------- logistic


class _DiagMoments:
    """Count, mean and centred sum of squares per feature, per fold (Chan updates)."""

    def __init__(self, n_folds: int, p: int, device):
        self.n = torch.zeros(n_folds, dtype=ACC, device=device)
        self.mean = torch.zeros(n_folds, p, dtype=ACC, device=device)
        self.m2 = torch.zeros(n_folds, p, dtype=ACC, device=device)
        self.class_counts: Tensor | None = None

    def update(self, x: Tensor, fold: Tensor) -> None:
        k = self.n.shape[0]
        x = x.to(ACC)
        nb = torch.bincount(fold, minlength=k).to(ACC)
        sums = torch.zeros_like(self.mean).index_add_(0, fold, x)
        mb = sums / nb.clamp_min(1)[:, None]
        m2b = torch.zeros_like(self.m2).index_add_(0, fold, (x - mb[fold]) ** 2)
        n = self.n + nb
        d = mb - self.mean
        self.m2 += m2b + d**2 * (self.n * nb / n.clamp_min(1))[:, None]
        self.mean += d * (nb / n.clamp_min(1))[:, None]
        self.n = n

    def combine(self, keep: Tensor) -> tuple[float, Tensor, Tensor]:
        """Pooled count, mean and variance of the folds where ``keep`` is True."""
        n = self.n[keep]
        N = n.sum()
        mean = (n[:, None] * self.mean[keep]).sum(0) / N
        m2 = (self.m2[keep] + n[:, None] * (self.mean[keep] - mean) ** 2).sum(0)
        return N.item(), mean, m2 / N


def _train_logistic(
    passes: Callable[[], Iterable[tuple]],
    n_classes: int,
    fold_fn: Callable[[Any, int], Tensor] | None,
    n_folds: int,
    *,
    l2: float,
    standardize: bool,
    max_iter: int,
    tol: float,
    dtype: torch.dtype,
    device,
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Train one model per fold (on the other folds) plus one on everything, jointly.

    The objectives are independent, so their sum has the same minimiser; one
    stream over the data then serves all k+1 models per L-BFGS evaluation.
    Returns per-model (weight [C, p], bias [C]) in raw input space, and the
    per-fold class counts.
    """
    k = n_folds if fold_fn is not None else 1
    M = k + 1 if fold_fn is not None else 1

    def batch_iter():
        for batch in passes():
            x, y, g = _unpack(batch)
            x = x.to(device=device)
            y = y.to(device=device)
            if y.numel() and (y.min() < 0 or y.max() >= n_classes):
                raise EmbedwalkError(f"labels must lie in [0, {n_classes})")
            fold = (torch.zeros(len(y), dtype=torch.long, device=device) if fold_fn is None
                    else fold_fn(g, len(y)).to(device))
            yield x, y, fold

    # Pass 0: per-fold feature moments (standardisation uses only each model's training rows).
    diag, class_counts = None, None
    for x, y, fold in batch_iter():
        if diag is None:
            diag = _DiagMoments(k, x.shape[1], device)
            class_counts = torch.zeros(k, n_classes, dtype=ACC, device=device)
        diag.update(x, fold)
        class_counts.index_put_((fold, y), torch.ones(len(y), dtype=ACC, device=device),
                                accumulate=True)
    if diag is None:
        raise EmbedwalkError("no batches: pass an iterable of (x [n, d], labels [n]) batches with at least one row")
    p = diag.mean.shape[1]
    folds = torch.arange(k, device=device)
    keeps = ([folds != m for m in range(k)] + [folds >= 0]) if fold_fn is not None else [folds >= 0]
    n_m, mu, sd = [], [], []
    for keep in keeps:
        n, mean, var = diag.combine(keep)
        s = var.sqrt()
        s = torch.where(s > 1e-12 * s.max().clamp_min(1e-300), s, torch.ones_like(s))
        n_m.append(max(n, 1.0))
        mu.append(mean)
        sd.append(s if standardize else torch.ones_like(s))
    mu = torch.stack(mu).to(dtype)  # [M, p]
    sd = torch.stack(sd).to(dtype)
    inv_n = torch.tensor(n_m, dtype=dtype, device=device).reciprocal()

    # scipy's L-BFGS-B (what scikit-learn uses) rather than torch.optim.LBFGS: same
    # method, proper convergence tests, and no import of torch._dynamo (seconds).
    from scipy.optimize import minimize

    n_w = M * n_classes * p
    model_ids = torch.arange(M, device=device)

    def raw_params(W, b):
        # Penalise in standardised units, evaluate in raw units: w_raw = w/σ, b_raw = b - w_raw·μ.
        A = W / sd[:, None, :]
        return A, b - (A * mu[:, None, :]).sum(-1)

    def unflatten(theta):
        t = torch.from_numpy(theta).to(device=device, dtype=dtype)
        return t[:n_w].view(M, n_classes, p), t[n_w:].view(M, n_classes)

    def loss_and_grad(theta):
        W, b = (t.detach().requires_grad_() for t in unflatten(theta))
        total = 0.0
        for x, y, fold in batch_iter():
            A, c = raw_params(W, b)
            logits = (x.to(dtype) @ A.reshape(M * n_classes, p).T).reshape(-1, M, n_classes) + c
            nll = torch.logsumexp(logits, -1) - logits.gather(
                -1, y[:, None, None].expand(-1, M, 1)).squeeze(-1)  # [n, M]
            if fold_fn is not None:
                member = fold[:, None] != model_ids[None, :]  # fold f's model skips fold f
            else:
                member = torch.ones_like(nll, dtype=torch.bool)
            loss = (nll * member * inv_n).sum()
            loss.backward()  # gradients accumulate over batches: one pass = full gradient
            total += loss.item()
        reg = 0.5 * l2 * (W * W).sum()
        reg.backward()
        grad = torch.cat([W.grad.reshape(-1), b.grad.reshape(-1)])
        return total + reg.item(), grad.to(ACC).cpu().numpy()

    res = minimize(loss_and_grad, np.zeros(n_w + M * n_classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": tol,
                            "ftol": 10 * torch.finfo(dtype).eps})
    with torch.no_grad():
        A, c = raw_params(*unflatten(res.x))
    return [(A[m].to(ACC), c[m].to(ACC)) for m in range(M)], class_counts


def fit_logistic_probe(
    batches: Batches,
    n_classes: int,
    *,
    l2: float = 1e-4,
    standardize: bool = True,
    max_iter: int = 100,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    class_names: Sequence[str] | None = None,
    source=None,
) -> LinearProbe:
    """Multinomial logistic regression, L2-penalised, by streaming full-batch L-BFGS.

    Minimises ``mean_i CE(x_i, y_i) + (l2/2)‖W‖²`` (intercept unpenalised).  With
    ``standardize=True`` the penalty applies to weights on standardised features
    (the usual probing convention; activations have a few huge dimensions); the
    returned probe is in raw input units either way.  For scikit-learn's
    ``LogisticRegression(C=…)`` on the same (standardised) data, ``l2 = 1/(C·n)``
    with three or more classes; with two, scikit-learn fits a single weight
    vector and ``l2 = 2/(C·n)`` gives the same decision function.
    Each L-BFGS evaluation is one pass over ``batches``; ``max_iter`` bounds the
    iterations and ``tol`` the projected gradient at convergence.  ``source`` (the model or
    store the batches come from) is recorded as the probe's ``fitted_in``.
    """
    passes = _passes(batches)
    [(w, bias)], counts = _train_logistic(
        passes, n_classes, None, 1, l2=l2, standardize=standardize, max_iter=max_iter,
        tol=tol, dtype=dtype, device=device or "cpu")
    return LinearProbe(w, bias, "logistic", _names(class_names), counts.sum(0),
                       {"l2": l2, "standardize": standardize}, identity_of(source))


def _names(class_names):
    return None if class_names is None else [str(c) for c in class_names]


# --------------------------------------------------------------------------- cross-validation


@summary_repr
@dataclass
class ProbeCV:
    """Held-out accuracy of a probe over group folds.

    ``probe`` is fitted on all rows; ``fold_probes[f]`` on every fold but f and
    scored on fold f.  ``confusion[f, i, j]`` counts held-out rows of class i
    predicted as j.  ``majority_baseline`` is the held-out accuracy of always
    answering each fold's training-majority class.
    """

    method: str
    probe: LinearProbe
    fold_probes: dict[int, LinearProbe]
    confusion: Int[Tensor, "k c c"]

    def _headline(self) -> list[str]:
        acc = self.fold_accuracy
        return [f"{self.method} probe, {acc.numel()} folds, {int(self.fold_n.sum())} held-out rows: "
                f"accuracy mean {float(acc.mean()):.3f} (folds {float(acc.min()):.3f}..{float(acc.max()):.3f})"]

    @property
    def fold_n(self) -> Tensor:
        return self.confusion.sum((1, 2))

    @property
    def fold_accuracy(self) -> Tensor:
        correct = self.confusion.diagonal(dim1=1, dim2=2).sum(1)
        return correct.to(ACC) / self.fold_n.clamp_min(1)

    @property
    def accuracy(self) -> float:
        """Pooled held-out accuracy (all held-out rows together)."""
        c = self.confusion.sum(0).to(ACC)
        return (c.diagonal().sum() / c.sum().clamp_min(1)).item()

    @property
    def balanced_accuracy(self) -> float:
        c = self.confusion.sum(0).to(ACC)
        support = c.sum(1)
        recall = c.diagonal()[support > 0] / support[support > 0]
        return recall.mean().item()

    @property
    def majority_baseline(self) -> float:
        per_class = self.confusion.sum(2).to(ACC)  # [k, C] held-out class counts
        total = per_class.sum(0)
        hits = 0.0
        for f in self.fold_probes:
            hits += per_class[f, (total - per_class[f]).argmax()].item()
        return hits / max(per_class.sum().item(), 1)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per held-out fold (``fold='all'`` pools them)."""
        rows = [{"method": self.method, "fold": str(f), "n_test": int(self.fold_n[f]),
                 "accuracy": self.fold_accuracy[f].item()} for f in sorted(self.fold_probes)]
        rows.append({"method": self.method, "fold": "all", "n_test": int(self.fold_n.sum()),
                     "accuracy": self.accuracy})
        df = pd.DataFrame(rows)
        df["majority_baseline"] = self.majority_baseline
        return df


_STAT_METHODS = {"mass_mean": fit_mass_mean_probe, "lda": fit_lda_probe}


def cross_validate_probe(
    batches: Batches,
    n_classes: int,
    method: str = "lda",
    *,
    n_folds: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    source=None,
    **fit_kwargs,
) -> ProbeCV:
    """k-fold held-out accuracy with folds by group (batches must carry groups).

    ``method`` is ``"mass_mean"``, ``"lda"`` (one statistics pass + one scoring
    pass) or ``"logistic"`` (L-BFGS passes + one scoring pass); ``fit_kwargs``
    go to the matching ``fit_*`` function; ``source`` (the model or store the batches come
    from) is recorded as every probe's ``fitted_in``.
    """
    ident = identity_of(source)
    passes = _passes(batches)

    def fold_fn(g, n):
        if g is None:
            raise EmbedwalkError("cross-validation needs batches of (x, labels, groups)")
        return torch.from_numpy(group_folds(g, n_folds, seed))

    if method in _STAT_METHODS:
        fit = _STAT_METHODS[method]
        fs = FoldedStats(n_folds, seed,
                         accumulator=lambda: ClassStats(n_classes, device=device,
                                                        class_names=class_names),
                         source=ident)
        for batch in passes():
            x, y, g = _unpack(batch)
            fs.update(x, y, folds=fold_fn(g, len(y)))
        probe = fit(fs.total(), **fit_kwargs)
        fold_probes = {f: fit(fs.train(f), **fit_kwargs)
                       for f in range(n_folds) if fs.folds[f].n > 0}
    elif method == "logistic":
        opts = dict(l2=1e-4, standardize=True, max_iter=100, tol=1e-7, dtype=torch.float32)
        opts.update(fit_kwargs)
        models, counts = _train_logistic(passes, n_classes, fold_fn, n_folds,
                                         device=device or "cpu", **opts)
        meta = {"l2": opts["l2"], "standardize": opts["standardize"]}
        names = _names(class_names)
        probe = LinearProbe(*models[n_folds], "logistic", names, counts.sum(0), meta, ident)
        fold_probes = {f: LinearProbe(*models[f], "logistic", names,
                                      counts.sum(0) - counts[f], meta, ident)
                       for f in range(n_folds) if counts[f].sum() > 0}
    else:
        raise EmbedwalkError(f"unknown method {method!r}; use 'mass_mean', 'lda' or 'logistic'")

    confusion = torch.zeros(n_folds, n_classes, n_classes, dtype=torch.long)
    for batch in passes():
        x, y, g = _unpack(batch)
        fold = fold_fn(g, len(y))
        for f, pr in fold_probes.items():
            rows = (fold == f).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            pred = pr.predict(x[rows.to(x.device)]).cpu()
            idx = y.cpu()[rows] * n_classes + pred
            confusion[f] += torch.bincount(idx, minlength=n_classes**2).reshape(n_classes, n_classes)
    return ProbeCV(method, probe, fold_probes, confusion)
