"""Controls for probe and regression scores.

A high held-out score says little until it is compared with what the same
method reaches on labels that carry no real structure:

* :func:`shuffle_labels_by_group` -- permute which *group* (prompt, entity)
  gets which label.  Rows of one group keep sharing a label, so any within-group
  dependence the model exploits survives and only the label-concept link breaks.
  Shuffling tokens instead would break within-group structure too and make the
  null too easy to beat.
* :func:`control_task_labels` -- Hewitt & Liang (2019): each *type* (token id,
  word) gets a random label drawn from the empirical label distribution,
  consistent across its occurrences.  A probe that scores well here is
  memorising types, not reading the concept; ``selectivity = real - control``.
* :func:`permutation_test` / :func:`control_task` / :func:`evaluate_controls`
  take a scoring callable ``score_fn(labels) -> float | array`` so they serve
  ridge (per-target R²) and probes (accuracy) alike.  Every reported score
  gets ``p = (1 + #{null ≥ real}) / (1 + n_null)``.

:func:`ridge_cv_scorer` and :func:`probe_cv_scorer` build such callables for
in-memory data.
"""

from __future__ import annotations

from embedwalk._summary import summary_repr
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = [
    "shuffle_labels_by_group",
    "control_task_labels",
    "permutation_p_value",
    "permutation_test",
    "control_task",
    "evaluate_controls",
    "PermutationResult",
    "ControlTaskResult",
    "ridge_cv_scorer",
    "probe_cv_scorer",
]

ScoreFn = Callable[[Any], Any]


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _to_numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


def _like(new: np.ndarray, ref):
    """Return ``new`` as the same kind of array as ``ref`` (torch stays torch)."""
    if isinstance(ref, Tensor):
        return torch.from_numpy(np.ascontiguousarray(new)).to(device=ref.device, dtype=ref.dtype)
    return new


def _group_index(keys) -> tuple[np.ndarray, np.ndarray]:
    k = _to_numpy(keys).reshape(-1)
    _, first, inverse = np.unique(k.astype(str) if k.dtype.kind == "O" else k,
                                  return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def shuffle_labels_by_group(labels, groups, seed: int | np.random.Generator = 0):
    """Labels with the group→label assignment permuted among groups.

    ``labels`` is [n] or [n, q] (targets for ridge); every group must have one
    label (constant over its rows).  Returns the same array type as ``labels``.
    """
    lab = _to_numpy(labels)
    first, inverse = _group_index(groups)
    if lab.shape[0] != inverse.shape[0]:
        raise EmbedwalkError("labels and groups must have the same number of rows")
    group_label = lab[first]
    if not np.array_equal(group_label[inverse], lab):
        raise EmbedwalkError("labels vary within a group; a group-level shuffle needs one label per group")
    perm = _rng(seed).permutation(len(first))
    return _like(group_label[perm][inverse], labels)


def control_task_labels(labels, types, seed: int | np.random.Generator = 0):
    """Hewitt & Liang control task: each type gets a random label, the same at every
    occurrence, drawn from the empirical (row-level) distribution of ``labels``."""
    lab = _to_numpy(labels)
    first, inverse = _group_index(types)
    if lab.shape[0] != inverse.shape[0]:
        raise EmbedwalkError("labels and types must have the same number of rows")
    draw = _rng(seed).integers(0, lab.shape[0], size=len(first))
    return _like(lab[draw][inverse], labels)


def permutation_p_value(real, null) -> np.ndarray:
    """``(1 + #{null ≥ real}) / (1 + n_null)``, elementwise over the score's shape.

    Never zero: the observed labelling counts as one of the permutations.
    """
    real = np.asarray(real, dtype=float)
    null = np.asarray(null, dtype=float).reshape((-1,) + real.shape)
    return (1 + (null >= real).sum(0)) / (1 + null.shape[0])


def _score(score_fn: ScoreFn, labels) -> np.ndarray:
    s = score_fn(labels)
    return np.asarray(_to_numpy(s) if isinstance(s, Tensor) else s, dtype=float)


def _frame(**cols) -> pd.DataFrame:
    cols = {k: np.atleast_1d(np.asarray(v, dtype=float)).reshape(-1) for k, v in cols.items()}
    return pd.DataFrame(cols).rename_axis("score").reset_index()


@summary_repr
@dataclass
class PermutationResult:
    """``real`` score, ``null[i]`` the score on the i-th group-shuffled labelling."""

    real: np.ndarray
    null: np.ndarray
    p_value: np.ndarray

    def _headline(self) -> list[str]:
        from embedwalk._summary import describe

        return [f"real {describe(self.real)}; null mean {describe(self.null.mean(0))} over {self.n_perm} permutations; "
                f"p {describe(self.p_value)}"]

    @property
    def n_perm(self) -> int:
        return self.null.shape[0]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per score element (per target for ridge)."""
        return _frame(real=self.real, null_mean=self.null.mean(0), null_std=self.null.std(0),
                      p_value=self.p_value, n_perm=np.full(self.real.shape, self.n_perm))


def permutation_test(
    score_fn: ScoreFn, labels, groups, *, n_perm: int = 100,
    seed: int | np.random.Generator = 0,
) -> PermutationResult:
    """Score the real labels and ``n_perm`` group-level shuffles of them.

    ``score_fn(labels)`` may return a scalar or an array (one score per target);
    p-values are elementwise.  Higher scores must mean better.
    """
    rng = _rng(seed)
    real = _score(score_fn, labels)
    null = np.stack([_score(score_fn, shuffle_labels_by_group(labels, groups, rng))
                     for _ in range(n_perm)])
    return PermutationResult(real, null, permutation_p_value(real, null))


@summary_repr
@dataclass
class ControlTaskResult:
    """Real score against control-task scores.  ``p_value`` asks whether the real
    labels beat the control task: ``(1 + #{control ≥ real}) / (1 + n_control)``."""

    real: np.ndarray
    control_scores: np.ndarray

    def _headline(self) -> list[str]:
        from embedwalk._summary import describe

        return [f"real {describe(self.real)}; control {describe(self.control)}; selectivity {describe(self.selectivity)}; "
                f"p {describe(self.p_value)} ({self.control_scores.shape[0]} control tasks)"]

    @property
    def control(self) -> np.ndarray:
        return self.control_scores.mean(0)

    @property
    def selectivity(self) -> np.ndarray:
        return self.real - self.control

    @property
    def p_value(self) -> np.ndarray:
        return permutation_p_value(self.real, self.control_scores)

    def to_dataframe(self) -> pd.DataFrame:
        return _frame(real=self.real, control=self.control, selectivity=self.selectivity,
                      p_value=self.p_value)


def control_task(
    score_fn: ScoreFn, labels, types, *, n_control: int = 10,
    seed: int | np.random.Generator = 0,
) -> ControlTaskResult:
    """Selectivity of a score: real labels vs ``n_control`` Hewitt & Liang control tasks."""
    rng = _rng(seed)
    real = _score(score_fn, labels)
    ctrl = np.stack([_score(score_fn, control_task_labels(labels, types, rng))
                     for _ in range(n_control)])
    return ControlTaskResult(real, ctrl)


def evaluate_controls(
    score_fn: ScoreFn, labels, groups, types=None, *, n_perm: int = 100,
    n_control: int = 10, seed: int = 0,
) -> pd.DataFrame:
    """One table with every control and a p-value for every score.

    Rows per score element: ``real`` (p against group shuffles), ``shuffled`` mean,
    and, when ``types`` is given, ``control`` (its own p against the same group
    shuffles: is the control task itself learnable?) and ``selectivity`` (p from
    the control draws: does the real task beat the control task?).
    """
    rng = np.random.default_rng(seed)
    perm = permutation_test(score_fn, labels, groups, n_perm=n_perm, seed=rng)
    cols = dict(real=perm.real, real_p=perm.p_value, shuffled=perm.null.mean(0))
    if types is not None:
        ct = control_task(score_fn, labels, types, n_control=n_control, seed=rng)
        cols.update(control=ct.control, control_p=permutation_p_value(ct.control, perm.null),
                    selectivity=ct.selectivity, selectivity_p=ct.p_value)
    cols["n_perm"] = np.full(perm.real.shape, n_perm)
    return _frame(**cols)


# --------------------------------------------------------------------------- scorers


def ridge_cv_scorer(
    x: Tensor, groups, *, alphas: Sequence[float] | None = None, n_folds: int = 5,
    seed: int = 0, overall: bool = False, batch_size: int = 8192,
) -> ScoreFn:
    """``score(targets) -> held-out R²`` (per target, or variance-weighted overall)
    of a group-fold CV ridge from ``x`` to ``targets``."""
    from .ridge import fit_ridge
    from .stats import FoldedStats, group_folds

    folds = torch.from_numpy(group_folds(groups, n_folds, seed))
    x = torch.as_tensor(x)

    def score(targets) -> np.ndarray:
        y = torch.as_tensor(_to_numpy(targets))
        fs = FoldedStats(n_folds, seed)
        for s in range(0, x.shape[0], batch_size):
            fs.update(x[s:s + batch_size], y[s:s + batch_size], folds=folds[s:s + batch_size])
        fit = fit_ridge(fs, alphas)
        return np.asarray(fit.cv_r2_overall if overall else fit.cv_r2.cpu().numpy())

    return score


def probe_cv_scorer(
    x: Tensor, groups, n_classes: int, method: str = "lda", *, n_folds: int = 5,
    seed: int = 0, batch_size: int = 8192, **fit_kwargs,
) -> ScoreFn:
    """``score(labels) -> held-out accuracy`` of :func:`cross_validate_probe`."""
    from .probes import cross_validate_probe
    from .stats import tensor_batches

    x = torch.as_tensor(x)
    g = _to_numpy(groups)

    def score(labels) -> float:
        y = torch.as_tensor(_to_numpy(labels)).long()
        cv = cross_validate_probe(tensor_batches(x, y, g, batch_size), n_classes, method,
                                  n_folds=n_folds, seed=seed, **fit_kwargs)
        return cv.accuracy

    return score
