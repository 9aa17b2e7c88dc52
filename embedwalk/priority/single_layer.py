"""The single self-attention layer of Li et al. (AISTATS 2024), its data and its training.

Model: embeddings ``x_1..x_K`` (unit-norm Gaussian, K <= d, so linearly independent),
one combined key-query matrix ``W`` (d x d), value = identity, query = last token.
For an input ``X = (x_{t_1}, ..., x_{t_T})`` with last token ``k = t_T``

    s = softmax(X W x_k)                       attention over positions
    p(token v | X) = sum_{t: t_t = v} s_t      mass on the positions holding v
    loss = mean over samples of -log p(y | X)

Because the value map is the identity the model can only output tokens of its input,
so the label is always made present in the input (the data generator replaces an absent
label by a random token of the sequence).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from embedwalk._summary import summary_repr
from ..errors import EmbedwalkError
from .graphs import PriorityGraphs, build_priority_graphs
from .svm import SVMConstraints, finite_subspace, fit_scale, graph_svm, reduced_key_mask, svm_constraints

__all__ = [
    "TokenDataset",
    "make_embeddings",
    "generate_dataset",
    "default_init",
    "attention",
    "loss_and_grad",
    "train",
    "TrainingRun",
    "run_experiment",
]

DTYPE = torch.float64  # the paper's experiments run in float64: the SVM direction emerges slowly


def make_embeddings(K: int, d: int, rng: np.random.Generator) -> Float[torch.Tensor, "K d"]:
    """K random Gaussian vectors in R^d, normalised to unit length."""
    if K > d:
        raise EmbedwalkError(
            f"K={K} tokens need K <= d={d}: the theory (and the feasibility of the graph-SVM) "
            "relies on linearly independent embeddings; raise d or lower K."
        )
    E = rng.standard_normal((K, d))
    return torch.tensor(E / np.linalg.norm(E, axis=1, keepdims=True), dtype=DTYPE)


@dataclass(eq=False)
class TokenDataset:
    """``n`` sequences of length ``T`` over ``K`` tokens, labels, and the embeddings."""

    sequences: Int[np.ndarray, "n T"]
    labels: Int[np.ndarray, " n"]
    embeddings: Float[torch.Tensor, "K d"]

    def __post_init__(self):
        self.sequences = np.asarray(self.sequences, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.sequences.ndim != 2 or self.labels.shape != (self.sequences.shape[0],):
            raise EmbedwalkError(
                f"need sequences [n, T] and labels [n]; got {self.sequences.shape} and {self.labels.shape}."
            )
        K = self.embeddings.shape[0]
        if self.sequences.min() < 0 or max(self.sequences.max(), self.labels.max()) >= K:
            raise EmbedwalkError(f"token ids must lie in [0, {K}) — one embedding row per token.")
        if not (self.sequences == self.labels[:, None]).any(axis=1).all():
            raise EmbedwalkError("every label must occur in its sequence: the model can only output input tokens.")

    @property
    def d(self) -> int:
        return self.embeddings.shape[1]

    @cached_property
    def graphs(self) -> PriorityGraphs:
        return build_priority_graphs(self.sequences, self.labels, vocab_size=self.embeddings.shape[0])

    @cached_property
    def constraints(self) -> SVMConstraints:
        return svm_constraints(self.sequences, self.labels, self.graphs, self.embeddings)

    @cached_property
    def component_mask(self) -> Bool[np.ndarray, "n T"]:
        """Positions holding a token of the predicted (highest-priority) component.

        On training data the label's SCC reaches every token of the input, so this is
        exactly the label's SCC — the same positions the reduced data set keeps.
        """
        return np.stack([np.isin(s, self.graphs.retrieval_set(s)) for s in self.sequences])


def generate_dataset(
    n: int, T: int, K: int, d: int, seed: int | np.random.Generator = 0, cyclic: bool = False, max_tries: int = 100_000
) -> TokenDataset:
    """Uniform random sequences and labels; an absent label is replaced by a random input token.

    ``cyclic=True`` resamples the sequences and labels (embeddings stay) until some
    G(k) has a cycle, i.e. an SCC with two or more tokens — the case where soft
    composition (a nonzero finite component) is needed.
    """
    if min(n, T, K, d) < 1:
        raise EmbedwalkError(f"n, T, K and d must be positive, got n={n}, T={T}, K={K}, d={d}.")
    rng = np.random.default_rng(seed)
    emb = make_embeddings(K, d, rng)
    for _ in range(max_tries):
        seqs = rng.integers(0, K, size=(n, T))
        labels = rng.integers(0, K, size=n)
        absent = ~(seqs == labels[:, None]).any(axis=1)
        labels[absent] = seqs[absent, rng.integers(0, T, size=absent.sum())]
        data = TokenDataset(seqs, labels, emb)
        if not cyclic or data.graphs.has_cycle():
            return data
    raise EmbedwalkError(f"no data set with a cycle in {max_tries} draws; raise n or lower K.")


def default_init(d: int, seed: int) -> Float[torch.Tensor, "d d"]:
    """PyTorch's default ``nn.Linear(d, d, bias=False)`` init: U(-1/sqrt(d), 1/sqrt(d))."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand(d, d, generator=g, dtype=DTYPE) * 2 - 1) / d**0.5


@dataclass
class _Batch:
    keys: Float[torch.Tensor, "n T d"]
    query: Float[torch.Tensor, "n d"]
    is_label: Bool[torch.Tensor, "n T"]
    key_mask: Bool[torch.Tensor, "n T"]

    @classmethod
    def of(cls, data: TokenDataset, key_mask: Bool[np.ndarray, "n T"] | None = None) -> "_Batch":
        seqs = torch.as_tensor(data.sequences)
        km = torch.ones(seqs.shape, dtype=torch.bool) if key_mask is None else torch.as_tensor(key_mask)
        return cls(
            keys=data.embeddings[seqs],
            query=data.embeddings[seqs[:, -1]],
            is_label=seqs == torch.as_tensor(data.labels)[:, None],
            key_mask=km,
        )


def attention(
    W: Float[torch.Tensor, "*steps d d"], batch: _Batch
) -> Float[torch.Tensor, "*steps n T"]:
    """softmax over positions of ``x_t^T W x_k`` (masked keys get no mass)."""
    Wq = batch.query @ W.transpose(-2, -1)  # row i is W x_k for sample i
    scores = (batch.keys @ Wq.unsqueeze(-1)).squeeze(-1)
    return scores.masked_fill(~batch.key_mask, -torch.inf).softmax(dim=-1)


def loss_and_grad(W: Float[torch.Tensor, "d d"], batch: _Batch) -> tuple[float, Float[torch.Tensor, "d d"]]:
    """Loss and its exact gradient.

    With ``m = sum_{t in label} s_t`` the derivative of ``-log m`` w.r.t. the score of
    position t is ``s_t - [t in label] s_t / m``: the attention minus its restriction to
    the label positions.  Scores are linear in W (``x_t^T W x_k``), hence the outer product.
    """
    s = attention(W, batch)
    on_label = s * batch.is_label
    m = on_label.sum(-1)
    coef = s - on_label / m[:, None]
    # sum_t coef_t x_t x_k^T per sample, averaged: (X^T coef) x_k^T
    grad = (coef.unsqueeze(1) @ batch.keys).squeeze(1).T @ batch.query / len(m)
    return float(-m.log().mean()), grad


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread: the tensors are tiny (n x T x d ~ 200 numbers), so
    thread start-up dominates, and on a busy machine it can cost 30x the actual work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    batch: _Batch, W0: Float[torch.Tensor, "d d"], iterations: int, lr: float = 0.01, log_every: int = 10
) -> Float[torch.Tensor, "snapshots d d"]:
    """Normalised gradient descent ``W <- W - lr * g / ||g||_F``; snapshots every ``log_every``.

    Normalising keeps the step length fixed while the gradient of the (separable) loss
    vanishes exponentially, so the weight norm keeps growing and the direction converges.
    """
    if iterations < 1 or log_every < 1 or iterations % log_every:
        raise EmbedwalkError(
            f"iterations={iterations} must be a positive multiple of log_every={log_every} "
            "so that the last snapshot is the final W."
        )
    W = W0.clone()
    snaps = [W.clone()]
    with _one_thread():
        for it in range(1, iterations + 1):
            _, g = loss_and_grad(W, batch)
            norm = g.norm()
            if norm > 0:  # zero gradient (e.g. every reduced sample one SCC): nothing to learn
                W = W - lr * g / norm
            if it % log_every == 0:
                snaps.append(W.clone())
    return torch.stack(snaps)


def _corr(A: Float[torch.Tensor, "*s d d"], B: Float[torch.Tensor, "*s d d"]) -> Float[torch.Tensor, " *s"]:
    """``<A, B> / (||A|| ||B||)``, defined as 0 when either is zero (no direction to compare)."""
    num = (A * B).sum(dim=(-2, -1))
    den = A.norm(dim=(-2, -1)) * B.norm(dim=(-2, -1))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


@summary_repr
@dataclass(eq=False)
class TrainingRun:
    """One data set trained; ``history`` has one row per snapshot."""

    data: TokenDataset
    W: Float[torch.Tensor, "snapshots d d"]
    W_reduced: Float[torch.Tensor, "snapshots d d"]
    W_svm: Float[torch.Tensor, "d d"]
    W_fin: Float[torch.Tensor, "d d"]
    history: pd.DataFrame = field(repr=False)


def run_experiment(
    data: TokenDataset, iterations: int = 4000, lr: float = 0.01, seed: int = 0, log_every: int = 10
) -> TrainingRun:
    """Train on ``data`` and on its reduced version from the same init; track the theory.

    Tracked per snapshot: loss, ``corr(W, W_svm)``, ``corr(W, R W_svm + W_fin)`` with R
    fitted by least squares, ``||P_fin W(t) - W_fin(t)||_F`` where ``W_fin(t)`` is the
    reduced run at the same step (projected; the reduced loss only sees S_fin), and the
    attention mass on the predicted component, averaged over samples.
    """
    W0 = default_init(data.d, seed)
    full = _Batch.of(data)
    W = train(full, W0, iterations, lr, log_every)
    reduced = _Batch.of(data, reduced_key_mask(data.sequences, data.labels, data.graphs))
    W_red = train(reduced, W0, iterations, lr, log_every)

    Q = torch.as_tensor(finite_subspace(data.graphs, data.embeddings))
    d = data.d

    def proj(M):  # orthogonal projection onto S_fin, batched over snapshots
        flat = M.reshape(*M.shape[:-2], d * d)
        return ((flat @ Q) @ Q.T).reshape(M.shape)

    W_svm = torch.as_tensor(graph_svm(data.constraints, d))
    W_fin = proj(W_red[-1])
    R = fit_scale(W, W_svm, W_fin)
    s = attention(W, full)
    comp = torch.as_tensor(data.component_mask)
    history = pd.DataFrame(
        {
            "iteration": np.arange(len(W)) * log_every,
            "loss": [loss_and_grad(w, full)[0] for w in W],
            "corr_svm": _corr(W, W_svm).numpy(),
            "corr_decomposition": _corr(W, R[:, None, None] * W_svm + W_fin).numpy(),
            "fin_gap": (proj(W) - proj(W_red)).norm(dim=(-2, -1)).numpy(),
            "mass_on_component": (s * comp).sum(-1).mean(-1).numpy(),
            "R": R.numpy(),
        }
    )
    return TrainingRun(data, W, W_red, W_svm, W_fin, history)
