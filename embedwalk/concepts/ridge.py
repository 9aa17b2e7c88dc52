"""Ridge regression solved from streaming statistics.

The fit needs only :class:`~embedwalk.concepts.stats.MomentStats`, never the
data: with centred cross-products ``Sxx``, ``Sxy`` the ridge solution with an
(unpenalised) intercept is

    B(α) = (Sxx + α I)⁻¹ Sxy,        b = ȳ - x̄ B(α),

the same objective as scikit-learn's ``Ridge(alpha, fit_intercept=True)``:
``‖y - XB - b‖² + α‖B‖²`` summed over rows.  One eigendecomposition
``Sxx = V Λ Vᵀ`` serves every α: ``B(α) = V diag(1/(λ+α)) Vᵀ Sxy``.

Cross-validation reads the held-out error straight from the held-out fold's
moments.  For coefficients B, intercept b and a fold with count m, means
x̄ₕ, ȳₕ and centred cross-products Sₕ, the residual splits into a constant
``d = ȳₕ - b - x̄ₕ B`` and a centred part, whose cross-term sums to zero:

    SSEⱼ = m dⱼ² + (Syyₕ - 2 BᵀSxyₕ + BᵀSxxₕB)ⱼⱼ

so the whole alpha sweep costs k eigendecompositions of p×p matrices and no
second pass over the data.  Data larger than memory is therefore no problem:
stream it through ``FoldedStats.update`` and call :func:`fit_ridge`.

X and Y are just two blocks of columns: regress vectors on concept targets or
concept features on vectors by choosing which you pass as ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from embedwalk.errors import EmbedwalkError
from embedwalk._summary import summary_repr
from .fitted import check_same, describe_identity
from .stats import ACC, FORMAT_VERSION, FoldedStats, MomentStats, load_tensors, save_tensors

__all__ = ["RidgeFit", "fit_ridge", "ridge_path", "heldout_sse", "default_alphas"]


def default_alphas(stats: MomentStats, n: int = 13) -> Float[Tensor, " a"]:
    """Log-spaced grid ``[1e-4, 1e2] × tr(Sxx)/p``, i.e. relative to the average
    eigenvalue of the pooled XᵀX, so it suits any activation scale."""
    scale = (stats.sxx.diagonal().sum() / max(stats.n_features, 1)).item()
    scale = scale if scale > 0 else 1.0
    return torch.logspace(-4, 2, n, dtype=ACC) * scale


class _EigenRidge:
    """Eigendecomposition of one split's XᵀX, reused for every alpha."""

    def __init__(self, stats: MomentStats):
        if stats.n < 1:
            raise EmbedwalkError("cannot fit ridge on empty statistics: update them with at least one batch of rows first")
        evals, self.V = torch.linalg.eigh(stats.sxx)
        self.evals = evals.clamp_min(0)  # round-off can make a PSD matrix's tiny eigenvalues negative
        self.W = self.V.T @ stats.sxy  # [p, q]: targets in the eigenbasis
        self.mean_x, self.mean_y = stats.mean_x, stats.mean_y
        # Below this a direction is null: treat as pseudo-inverse instead of 1/0 when α = 0.
        self.tol = self.evals.max().item() * self.evals.shape[0] * torch.finfo(ACC).eps

    def coef(self, alpha: Tensor) -> Float[Tensor, "p q"]:
        """``alpha`` is a scalar or one value per target ([q])."""
        alpha = torch.as_tensor(alpha, dtype=ACC, device=self.V.device).reshape(1, -1)
        denom = self.evals[:, None] + alpha
        inv = torch.where(denom > self.tol, 1.0 / denom.clamp_min(self.tol), torch.zeros_like(denom))
        return self.V @ (inv * self.W)

    def intercept(self, B: Tensor) -> Float[Tensor, " q"]:
        return self.mean_y - self.mean_x @ B


def heldout_sse(
    B: Float[Tensor, "p q"], intercept: Float[Tensor, " q"], test: MomentStats
) -> Float[Tensor, " q"]:
    """Sum of squared residuals of ``x @ B + intercept`` on the rows summarised by ``test``."""
    d = test.mean_y - intercept - test.mean_x @ B
    quad = ((test.sxx @ B) * B).sum(0)
    cross = (B * test.sxy).sum(0)
    sse = test.n * d**2 + test.syy.diagonal() - 2 * cross + quad
    return sse.clamp_min(0)  # the cancellation can leave -1e-12 when the fit is perfect


def ridge_path(
    stats: MomentStats, alphas: Sequence[float] | Tensor
) -> tuple[Float[Tensor, "a p q"], Float[Tensor, "a q"]]:
    """Coefficients and intercepts for every alpha from one eigendecomposition."""
    solver = _EigenRidge(stats)
    coefs = torch.stack([solver.coef(a) for a in torch.as_tensor(alphas, dtype=ACC)])
    return coefs, solver.mean_y - solver.mean_x @ coefs


@summary_repr
@dataclass
class RidgeFit:
    """A ridge regression ``y ≈ x @ coef + intercept`` with its cross-validation record.

    ``alpha`` is the strength used for each target.  When fitted from
    :class:`FoldedStats`: ``alphas`` is the grid, ``cv_mse[a, j]`` the pooled
    held-out MSE of target j at ``alphas[a]`` (out-of-fold SSE summed over folds /
    n), ``cv_r2[j] = 1 - SSE_oof / SST`` with SST about the pooled mean (what
    ``r2_score(y, cross_val_predict(...))`` reports), and ``cv_fold_r2[f, j]``
    each fold's own R² at the chosen alpha.  ``fitted_in`` is the model and residual basis
    of the statistics (:mod:`embedwalk.concepts.fitted`; None: unknown); ``predict(x,
    source=model_or_store)`` refuses activations of another model or basis.
    """

    coef: Float[Tensor, "p q"]
    intercept: Float[Tensor, " q"]
    alpha: Float[Tensor, " q"]
    n: int
    train_r2: Float[Tensor, " q"]
    alphas: Float[Tensor, " a"] | None = None
    cv_mse: Float[Tensor, "a q"] | None = None
    cv_r2: Float[Tensor, " q"] | None = None
    cv_r2_path: Float[Tensor, "a q"] | None = None
    cv_fold_r2: Float[Tensor, "k q"] | None = None
    cv_fold_n: list[int] | None = None
    target_names: list[str] | None = None
    feature_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    fitted_in: dict | None = None
    _repr_skip = ("fitted_in",)  # the headline names it

    def check_compatible(self, model_or_store) -> None:
        """Raise EmbedwalkError if ``model_or_store`` is another model or residual basis than
        the one this map was fitted on (a map of unknown origin passes)."""
        check_same(self.fitted_in, model_or_store, "this RidgeFit", "applied to activations of")

    def _headline(self) -> list[str]:
        out = [f"ridge map: {self.n_features} features -> {self.n_targets} targets, n={self.n}, "
               f"fitted on {describe_identity(self.fitted_in)}"]
        if self.cv_r2 is not None:
            r2 = self.cv_r2.double()
            out.append(f"held-out R²: overall {self.cv_r2_overall:.4g}; per target min {float(r2.min()):.4g}, "
                       f"median {float(r2.median()):.4g}, max {float(r2.max()):.4g}")
        tr = self.train_r2.double()
        out.append(f"train R²: mean {float(tr.mean()):.4g}; alpha {float(self.alpha.min()):.3g}..{float(self.alpha.max()):.3g}")
        return out

    @property
    def n_features(self) -> int:
        return self.coef.shape[0]

    @property
    def n_targets(self) -> int:
        return self.coef.shape[1]

    @property
    def cv_r2_overall(self) -> float | None:
        """Fraction of the targets' total variance explained out of fold (variance-weighted R²)."""
        if self.cv_r2 is None:
            return None
        sst = self.meta["sst"]
        sst = torch.as_tensor(sst, dtype=ACC)
        return float(1 - ((1 - self.cv_r2) * sst).sum() / sst.sum().clamp_min(1e-300))

    def predict(self, x: Float[Tensor, "n p"], *, source=None) -> Float[Tensor, "n q"]:
        if source is not None:
            self.check_compatible(source)
        x = torch.as_tensor(x)
        out = x.to(device=self.coef.device, dtype=ACC) @ self.coef + self.intercept
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        return out.to(dtype)

    def sse(self, stats: MomentStats) -> Float[Tensor, " q"]:
        return heldout_sse(self.coef, self.intercept, stats)

    def r2(self, stats: MomentStats) -> Float[Tensor, " q"]:
        """Per-target R² on the rows ``stats`` summarises (``r2_score(..., multioutput='raw_values')``)."""
        sst = stats.syy.diagonal()
        return 1 - self.sse(stats) / sst.clamp_min(torch.finfo(ACC).tiny)

    def r2_overall(self, stats: MomentStats) -> float:
        """Variance-weighted R² on ``stats``."""
        return float(1 - self.sse(stats).sum() / stats.syy.diagonal().sum())

    def to_dataframe(self) -> pd.DataFrame:
        """One row per target."""
        names = self.target_names or [str(j) for j in range(self.n_targets)]
        df = pd.DataFrame({
            "target": names,
            "alpha": self.alpha.cpu().numpy(),
            "train_r2": self.train_r2.cpu().numpy(),
            "n": self.n,
        })
        if self.cv_r2 is not None:
            a_idx = self.meta["alpha_index"]
            df["cv_r2"] = self.cv_r2.cpu().numpy()
            df["cv_mse"] = self.cv_mse[a_idx, torch.arange(self.n_targets)].cpu().numpy()
            df["cv_r2_fold_std"] = self.cv_fold_r2.std(0).cpu().numpy()
        return df

    def plot(self, ax=None, targets: Sequence[int] | None = None, max_lines: int = 20):
        """CV R² against alpha: one thin line per target (the first ``max_lines``
        unless ``targets`` picks them), the variance-weighted pooled curve in
        black, and dots at the chosen alphas.  Returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        from embedwalk.figures import visible_token

        if self.cv_r2_path is None:
            raise EmbedwalkError("plot needs a fit from FoldedStats (no CV record here)")
        ax = ax or plt.subplots(figsize=(6.5, 4), constrained_layout=True)[1]
        a = self.alphas.cpu().numpy()
        path = self.cv_r2_path.cpu().numpy()
        idx = list(targets) if targets is not None else list(range(min(self.n_targets, max_lines)))
        names = self.target_names or [str(j) for j in range(self.n_targets)]
        for j in idx:
            (line,) = ax.plot(a, path[:, j], lw=0.8, alpha=0.6,
                              label=visible_token(names[j], 24) if len(idx) <= 10 else None)
            ax.plot(self.alpha[j].item(), self.cv_r2[j].item(), "o", ms=4, color=line.get_color())
        sst = np.asarray(self.meta["sst"])
        pooled = 1 - ((1 - path) * sst).sum(1) / sst.sum()
        ax.plot(a, pooled, color="black", lw=2, label="all targets (variance-weighted)")
        ax.plot([], [], "o", ms=4, color="0.4", label="chosen alpha per target")
        ax.axhline(0, color="0.5", lw=0.6, ls=":")  # R² 0: no better than predicting the mean
        ax.set_xscale("log")
        ax.set_xlabel("ridge penalty alpha (log scale)")
        ax.set_ylabel("held-out R² (k-fold CV; 0 = the mean)")
        shown = f"{len(idx)} of {self.n_targets} targets" if len(idx) < self.n_targets else f"{self.n_targets} targets"
        ax.set_title(f"cross-validated R² against alpha, {shown}", fontsize=10)
        # outside the axes, so the legend never hides a curve
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return ax

    # -- persistence ------------------------------------------------------------
    _TENSORS = ("coef", "intercept", "alpha", "train_r2", "alphas", "cv_mse", "cv_r2",
                "cv_r2_path", "cv_fold_r2")

    def save(self, path: str | Path) -> None:
        tensors = {k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}
        meta = {
            "class": "RidgeFit", "format_version": FORMAT_VERSION, "n": self.n,
            "cv_fold_n": self.cv_fold_n, "target_names": self.target_names,
            "feature_names": self.feature_names, "meta": self.meta, "fitted_in": self.fitted_in,
        }
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "RidgeFit":
        t, m = load_tensors(path)
        if m.get("class") != "RidgeFit":
            raise EmbedwalkError(f"{path} holds {m.get('class')!r}, not a RidgeFit")
        return cls(n=m["n"], cv_fold_n=m["cv_fold_n"], target_names=m["target_names"],
                   feature_names=m["feature_names"], meta=m["meta"], fitted_in=m.get("fitted_in"),
                   **{k: t.get(k) for k in cls._TENSORS})


def fit_ridge(
    stats: MomentStats | FoldedStats,
    alphas: float | Sequence[float] | Tensor | None = None,
    *,
    alpha_per_target: bool = True,
    target_names: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
) -> RidgeFit:
    """Fit ridge regression(s) of Y on X from streaming statistics.

    With :class:`FoldedStats` every alpha in ``alphas`` is scored by k-fold CV
    over the group folds and the best one (lowest pooled held-out MSE; the first
    on ties) is kept for each target (``alpha_per_target=True``) or for all
    targets together; the final model is refitted on all folds.  With plain
    :class:`MomentStats` there is nothing to cross-validate: ``alphas`` must be a
    single value or one per target.  ``alphas=None`` uses :func:`default_alphas`.
    """
    names = dict(
        target_names=None if target_names is None else [str(s) for s in target_names],
        feature_names=None if feature_names is None else [str(s) for s in feature_names],
    )
    if isinstance(stats, MomentStats):
        return _fit_plain(stats, alphas, names)
    if not isinstance(stats, FoldedStats) or not isinstance(stats.folds[0], MomentStats):
        raise TypeError("fit_ridge takes MomentStats or FoldedStats of MomentStats")

    total = stats.total()
    grid = default_alphas(total) if alphas is None else torch.as_tensor(alphas, dtype=ACC).reshape(-1)
    grid = grid.to(total.device)
    used = [f for f in range(stats.n_folds) if stats.folds[f].n > 0]
    if len(used) < 2:
        raise EmbedwalkError(f"need at least two non-empty folds, have counts {stats.counts}")
    q = total.n_targets

    sse = torch.zeros(len(grid), q, dtype=ACC, device=total.device)
    fold_sse = []
    for f in used:
        solver, test = _EigenRidge(stats.train(f)), stats.test(f)
        per_alpha = []
        for a in grid:
            B = solver.coef(a)
            per_alpha.append(heldout_sse(B, solver.intercept(B), test))
        per_alpha = torch.stack(per_alpha)  # [A, q]
        fold_sse.append(per_alpha)
        sse += per_alpha

    if alpha_per_target:
        best = sse.argmin(0)  # [q]
    else:
        best = sse.sum(1).argmin().expand(q)
    alpha = grid[best]

    solver = _EigenRidge(total)
    coef = solver.coef(alpha)
    intercept = solver.intercept(coef)
    sst = total.syy.diagonal()
    tiny = torch.finfo(ACC).tiny
    cv_r2_path = 1 - sse / sst.clamp_min(tiny)
    cols = torch.arange(q, device=best.device)
    fold_r2 = torch.stack([
        1 - fs[best, cols] / stats.test(f).syy.diagonal().clamp_min(tiny)
        for f, fs in zip(used, fold_sse)
    ])
    return RidgeFit(
        coef=coef, intercept=intercept, alpha=alpha, n=total.n,
        train_r2=1 - heldout_sse(coef, intercept, total) / sst.clamp_min(tiny),
        alphas=grid, cv_mse=sse / total.n, cv_r2=cv_r2_path[best, cols], cv_r2_path=cv_r2_path,
        cv_fold_r2=fold_r2, cv_fold_n=[stats.folds[f].n for f in used],
        meta={"sst": sst.tolist(), "alpha_index": best.tolist(), "folds_used": used,
              "alpha_per_target": alpha_per_target},
        fitted_in=stats.fitted_in, **names,
    )


def _fit_plain(stats: MomentStats, alphas, names) -> RidgeFit:
    if alphas is None:
        raise EmbedwalkError("plain MomentStats cannot choose alpha; pass one, or use FoldedStats")
    alpha = torch.as_tensor(alphas, dtype=ACC, device=stats.device).reshape(-1)
    q = stats.n_targets
    if alpha.numel() == 1:
        alpha = alpha.expand(q).clone()
    elif alpha.numel() != q:
        raise EmbedwalkError("with MomentStats pass one alpha or one per target (no CV to choose)")
    solver = _EigenRidge(stats)
    coef = solver.coef(alpha)
    intercept = solver.intercept(coef)
    sst = stats.syy.diagonal()
    r2 = 1 - heldout_sse(coef, intercept, stats) / sst.clamp_min(torch.finfo(ACC).tiny)
    return RidgeFit(coef=coef, intercept=intercept, alpha=alpha, n=stats.n, train_r2=r2,
                    meta={"sst": sst.tolist()}, fitted_in=stats.fitted_in, **names)
