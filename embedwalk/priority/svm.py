"""Graph-SVM and the finite subspace: the two parts of the trained attention weights.

Li et al. decompose the key-query matrix learned by gradient descent as
``W(t) ~ R(t) * W_svm + W_fin``:

* ``W_svm`` (directional, grows without bound) solves the graph-SVM

      min ||W||_F  s.t.  (x_y - x_j)^T W x_k  = 0   if y, j share an SCC of G(k)
                         (x_y - x_j)^T W x_k >= 1   otherwise

  for every sample with last token k, label y and other input token j.  It separates
  each sample's top SCC from everything below it: *hard retrieval*.
* ``W_fin`` (finite) lives in S_fin = span{(x_i - x_j) x_k^T : i, j in one SCC of G(k)},
  the subspace on which the SVM's equality constraints act.  It sets the mixing weights
  inside the top SCC: *soft composition*.  It is the limit of training on the reduced
  data set that keeps only the tokens of each label's SCC (see :func:`reduced_key_mask`).

``x_i`` are the (unit-norm) embeddings the model actually sees, so both objects live in
the same space as the model parameter W.
"""

from __future__ import annotations

from dataclasses import dataclass

import clarabel
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy import sparse

from ..errors import EmbedwalkError
from .graphs import PriorityGraphs

__all__ = [
    "SVMConstraints",
    "svm_constraints",
    "graph_svm",
    "finite_subspace",
    "reduced_key_mask",
    "fit_scale",
]


@dataclass
class SVMConstraints:
    """Rows ``a`` with ``<a, vec(W)> = 0`` (``equal``) or ``>= 1`` (``~equal``).

    ``triples`` holds the deduplicated ``(k, y, j)`` each row came from.
    """

    rows: Float[np.ndarray, "m dd"]
    equal: Bool[np.ndarray, " m"]
    triples: Int[np.ndarray, "m 3"]

    def residuals(self, W: Float[np.ndarray, "d d"]) -> Float[np.ndarray, " m"]:
        """``(x_y - x_j)^T W x_k`` for every constraint."""
        return self.rows @ np.asarray(W, dtype=np.float64).ravel()

    def violation(self, W: Float[np.ndarray, "d d"]) -> float:
        """Largest violation: |equality residual| or (1 - margin) of an inequality."""
        r = self.residuals(W)
        worst_eq = np.abs(r[self.equal]).max(initial=0.0)
        worst_in = (1.0 - r[~self.equal]).max(initial=-np.inf)
        return float(max(worst_eq, worst_in, 0.0))


def _outer_rows(
    emb: Float[np.ndarray, "K d"], a: Int[np.ndarray, " m"], b: Int[np.ndarray, " m"], k: Int[np.ndarray, " m"]
) -> Float[np.ndarray, "m dd"]:
    """Row-major ``vec((x_a - x_b) x_k^T)`` so that ``<row, vec(W)> = (x_a - x_b)^T W x_k``."""
    return np.einsum("md,me->mde", emb[a] - emb[b], emb[k]).reshape(len(a), -1)


def svm_constraints(
    sequences: Int[np.ndarray, "n T"],
    labels: Int[np.ndarray, " n"],
    graphs: PriorityGraphs,
    embeddings: Float[np.ndarray, "K d"],
) -> SVMConstraints:
    """One constraint per distinct ``(k, y, j)`` of the data set (duplicates add nothing)."""
    seqs = np.asarray(sequences, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    emb = _as_numpy(embeddings)
    n, T = seqs.shape
    k = np.repeat(seqs[:, -1], T)
    y = np.repeat(labels, T)
    j = seqs.ravel()
    keep = j != y
    triples = np.unique(np.stack([k[keep], y[keep], j[keep]], axis=1), axis=0)
    k, y, j = triples.T
    equal = graphs.component_ids(k, y) == graphs.component_ids(k, j)
    return SVMConstraints(_outer_rows(emb, y, j, k), equal, triples)


def graph_svm(constraints: SVMConstraints, d: int) -> Float[np.ndarray, "d d"]:
    """Solve ``min 1/2 ||W||_F^2`` under the graph constraints with Clarabel (a QP).

    Returns the zero matrix when every constraint is an equality: nothing then needs
    to be separated and there is no directional component.
    """
    A_eq = constraints.rows[constraints.equal]
    A_in = constraints.rows[~constraints.equal]
    if A_in.shape[0] == 0:
        return np.zeros((d, d))
    # Clarabel's form: A w + s = b with s in a cone.  Equalities: s in {0}, so A_eq w = 0.
    # Inequalities: -A_in w + s = -1 with s >= 0, i.e. A_in w >= 1.
    A = sparse.csc_matrix(np.vstack([A_eq, -A_in]))
    b = np.concatenate([np.zeros(len(A_eq)), -np.ones(len(A_in))])
    cones = ([clarabel.ZeroConeT(len(A_eq))] if len(A_eq) else []) + [clarabel.NonnegativeConeT(len(A_in))]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    solver = clarabel.DefaultSolver(sparse.identity(d * d, format="csc"), np.zeros(d * d), A, b, cones, settings)
    sol = solver.solve()
    if str(sol.status) != "Solved":
        raise EmbedwalkError(
            f"graph-SVM not solved (Clarabel status {sol.status}); the constraints may be infeasible, "
            "which happens when embeddings are linearly dependent (use K <= d random embeddings)."
        )
    return np.asarray(sol.x).reshape(d, d)


def finite_subspace(graphs: PriorityGraphs, embeddings: Float[np.ndarray, "K d"]) -> Float[np.ndarray, "dd r"]:
    """Orthonormal basis (columns, row-major vec) of S_fin.

    Spanned by ``(x_i - x_r) x_k^T`` for every SCC of every G(k), with ``r`` the SCC's
    first token: differences to one member span all within-SCC differences.
    """
    emb = _as_numpy(embeddings)
    d = emb.shape[1]
    a, b, k = [], [], []
    for key in graphs.keys:
        for comp in graphs.components(int(key)):
            a.extend(comp[1:])
            b.extend([comp[0]] * (len(comp) - 1))
            k.extend([key] * (len(comp) - 1))
    if not a:
        return np.zeros((d * d, 0))
    B = _outer_rows(emb, np.array(a), np.array(b), np.array(k))
    U, S, _ = np.linalg.svd(B.T, full_matrices=False)
    return U[:, S > S.max() * 1e-10]


def reduced_key_mask(
    sequences: Int[np.ndarray, "n T"], labels: Int[np.ndarray, " n"], graphs: PriorityGraphs
) -> Bool[np.ndarray, "n T"]:
    """Keys kept in the reduced data set: the positions whose token shares the label's SCC.

    The query stays the original last token (its score vector ``W x_k`` is what the
    finite component shapes), even where that token itself is dropped as a key.
    """
    seqs = np.asarray(sequences, dtype=np.int64)
    k = np.broadcast_to(seqs[:, -1:], seqs.shape)
    y = np.broadcast_to(np.asarray(labels, dtype=np.int64)[:, None], seqs.shape)
    return graphs.component_ids(k, seqs) == graphs.component_ids(k, y)


def fit_scale(
    W: Float[torch.Tensor, "*steps d d"], W_svm: Float[torch.Tensor, "d d"], W_fin: Float[torch.Tensor, "d d"]
) -> Float[torch.Tensor, " *steps"]:
    """Least-squares ``R`` in ``W ~ R * W_svm + W_fin`` (0 when there is no W_svm)."""
    norm2 = (W_svm * W_svm).sum()
    if norm2 == 0:
        return torch.zeros(W.shape[:-2], dtype=W.dtype)
    return ((W - W_fin) * W_svm).sum(dim=(-2, -1)) / norm2


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float64) if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
