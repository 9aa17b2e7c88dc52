"""Token-priority graphs (Li, Huang, Ildiz, Rawat & Oymak, AISTATS 2024).

For every last (query) token ``k`` the training samples whose last token is ``k``
define a directed graph G(k): a sample ``(X, y)`` adds the edge ``y -> j`` for every
token ``j`` of ``X`` with ``j != y`` ("to predict y, attention must prefer y over j").
The strongly connected components (SCCs) of G(k) are the *priority classes*;
reachability between SCCs orders them.  A trained single attention layer

* hard-retrieves: puts all its mass on the highest-priority SCC present in the input;
* soft-composes: splits that mass between the tokens of the SCC with finite weights.

All G(k) are built at once as one disjoint graph whose nodes are ``(k, token)``
pairs, so a single call to ``scipy.sparse.csgraph.connected_components`` finds every
SCC and there is no Python loop over samples or over last tokens.

Retrieval rule when several top components are present
------------------------------------------------------
The components present in an input form a sub-order of the condensation DAG.  The
*maximal* present components are those that no other present component reaches.
When there is exactly one, the theory predicts attention collapses onto it.  When
there are several (incomparable: the training data never ranked them against each
other) the graph alone cannot say which one wins; the trained weights break the tie.
:meth:`PriorityGraphs.retrieval_set` therefore returns the *union* of all maximal
components, and :meth:`PriorityGraphs.retrieval_components` returns them separately so
that a caller can detect the ambiguous case (``len(...) > 1``).  Tokens that never
occurred in G(k) carry no priority information and are ignored; an unknown last
token gives an empty retrieval set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Bool, Int
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from ..errors import EmbedwalkError

__all__ = ["PriorityGraphs", "build_priority_graphs"]


def _ranges(starts: Int[np.ndarray, " m"], stops: Int[np.ndarray, " m"]) -> Int[np.ndarray, " total"]:
    """Concatenate ``arange(start, stop)`` for many ranges without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each output slot is its range's start plus its offset inside the range.
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _unique(x: Int[np.ndarray, " m"]) -> Int[np.ndarray, " u"]:
    """Sorted unique values.  Sort-based on purpose: numpy 2's hash-based ``np.unique``
    is an order of magnitude slower on the tens of millions of int64 codes we dedupe."""
    x = np.sort(x, kind="quicksort")
    return x[np.r_[True, x[1:] != x[:-1]]] if x.size else x


def _indptr(sorted_rows: Int[np.ndarray, " m"], n_rows: int) -> Int[np.ndarray, " n_rows+1"]:
    """CSR row pointers for already-sorted row indices (a counting pass, no search)."""
    return np.r_[0, np.cumsum(np.bincount(sorted_rows, minlength=n_rows))]


def _check_samples(sequences, labels, mask):
    sequences = np.asarray(sequences)
    labels = np.asarray(labels)
    if sequences.ndim != 2:
        raise EmbedwalkError(
            f"sequences must be a 2-D integer array [n_samples, seq_len], got shape {sequences.shape}; "
            "pad variable-length samples and pass `mask`."
        )
    if labels.shape != (sequences.shape[0],):
        raise EmbedwalkError(
            f"labels must have shape ({sequences.shape[0]},) — one label per sequence — "
            f"but got {labels.shape}."
        )
    if not (np.issubdtype(sequences.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
        raise EmbedwalkError("sequences and labels must hold integer token ids (cast with .astype(np.int64)).")
    if mask is None:
        mask = np.ones(sequences.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != sequences.shape:
        raise EmbedwalkError(f"mask shape {mask.shape} must equal sequences shape {sequences.shape}.")
    if sequences.shape[0] == 0 or sequences.shape[1] == 0:
        raise EmbedwalkError(f"need at least one sample with at least one token, got shape {sequences.shape}.")
    if sequences[mask].min(initial=0) < 0 or labels.min(initial=0) < 0:
        raise EmbedwalkError("token ids must be non-negative.")
    if not mask.any(axis=1).all():
        raise EmbedwalkError("every sample needs at least one unmasked token (its last token is the query).")
    return sequences.astype(np.int64, copy=False), labels.astype(np.int64, copy=False), mask


def build_priority_graphs(
    sequences: Int[np.ndarray, "n T"],
    labels: Int[np.ndarray, " n"],
    mask: Bool[np.ndarray, "n T"] | None = None,
    vocab_size: int | None = None,
) -> "PriorityGraphs":
    """Build every G(k) from ``(sequences, labels)``.

    The last token of a sample is its last *unmasked* position.  ``mask`` (True =
    real token) lets samples of different lengths share one padded array.
    """
    seqs, labels, mask = _check_samples(sequences, labels, mask)
    n, T = seqs.shape
    max_tok = max(int(seqs[mask].max(initial=-1)), int(labels.max(initial=-1)))
    V = int(vocab_size) if vocab_size is not None else max_tok + 1
    if max_tok >= V:
        raise EmbedwalkError(f"vocab_size={V} but a token id {max_tok} occurs; pass vocab_size > {max_tok}.")
    if V > np.iinfo(np.int64).max // V // V:
        raise EmbedwalkError(f"vocab_size={V} is too large to encode (k, y, j) triples in int64.")

    last_pos = T - 1 - np.argmax(mask[:, ::-1], axis=1)
    keys = seqs[np.arange(n), last_pos]

    # Node (k, token) -> one int64 so one sort both dedupes nodes and groups them by k.
    flat = mask.ravel()
    kV = np.repeat(keys * V, T)[flat]  # k * V of each position's sample
    y = np.repeat(labels, T)[flat]
    j = seqs.ravel()[flat]
    nodes = _unique(np.concatenate([kV + j, keys * V + labels]))

    # Edge (k, y, j) -> one int64 so duplicates (the bulk on real corpora) vanish in one sort.
    is_edge = j != y
    triples = _unique((kV[is_edge] + y[is_edge]) * V + j[is_edge])
    del kV, y, j, is_edge  # as large as the input; free them before the graph work
    k_e, rest = np.divmod(triples, V * V)
    y_e, j_e = np.divmod(rest, V)
    # Triples are sorted by (k, y), so sources come out sorted and the CSR matrix can be
    # assembled directly instead of through a COO conversion.
    src = np.searchsorted(nodes, k_e * V + y_e)
    dst = np.searchsorted(nodes, k_e * V + j_e)
    indptr = _indptr(src, nodes.size)
    adj = sparse.csr_matrix((np.ones(dst.size, dtype=np.int8), dst, indptr), shape=(nodes.size,) * 2)
    n_comp, comp = connected_components(adj, directed=True, connection="strong")

    # Condensation DAG: edges between distinct SCCs, deduped.
    cs, cd = comp[src].astype(np.int64), comp[dst].astype(np.int64)
    keep = cs != cd
    cs, cd = np.divmod(_unique(cs[keep] * n_comp + cd[keep]), n_comp)
    dag = sparse.csr_matrix(
        (np.ones(cd.size, dtype=np.int8), cd, _indptr(cs, n_comp)), shape=(n_comp,) * 2
    )
    return PriorityGraphs(
        vocab_size=V,
        node_code=nodes,
        node_comp=comp.astype(np.int64),
        comp_size=np.bincount(comp, minlength=n_comp),
        dag=dag,
        n_edges=int(src.size),
    )


@dataclass(eq=False)
class PriorityGraphs:
    """All token-priority graphs G(k) of a data set, with their SCCs and their order.

    Node ``i`` is the pair ``(k, token) = divmod(node_code[i], vocab_size)``; nodes are
    sorted by that code, so the nodes of one G(k) form a contiguous slice.  ``dag`` is
    the condensation (component -> component), acyclic, over all graphs at once.
    """

    vocab_size: int
    node_code: Int[np.ndarray, " nodes"]
    node_comp: Int[np.ndarray, " nodes"]
    comp_size: Int[np.ndarray, " comps"]
    dag: sparse.csr_matrix
    n_edges: int

    # ------------------------------------------------------------------ queries
    @property
    def keys(self) -> Int[np.ndarray, " keys"]:
        """Last-token ids that have a graph."""
        return _unique(self.node_code // self.vocab_size)

    def _slice(self, k: int) -> slice:
        lo, hi = np.searchsorted(self.node_code, [k * self.vocab_size, (k + 1) * self.vocab_size])
        return slice(int(lo), int(hi))

    def _node_ids(self, k: int, tokens: Int[np.ndarray, " m"]) -> Int[np.ndarray, " m"]:
        """Node index of each ``(k, token)``, or -1 where G(k) never saw the token."""
        tokens = np.asarray(tokens, dtype=np.int64)
        out = np.full(tokens.shape, -1, dtype=np.int64)
        ok = (tokens >= 0) & (tokens < self.vocab_size)
        if not 0 <= k < self.vocab_size:
            return out
        code = k * self.vocab_size + tokens[ok]
        pos = np.searchsorted(self.node_code, code).clip(max=self.node_code.size - 1)
        out[ok] = np.where(self.node_code[pos] == code, pos, -1)
        return out

    def component_ids(self, keys: Int[np.ndarray, " m"], tokens: Int[np.ndarray, " m"]) -> Int[np.ndarray, " m"]:
        """SCC id of each ``(keys[i], tokens[i])`` node (global ids, comparable only
        within one key), or -1 where G(key) never saw the token."""
        keys, tokens = np.broadcast_arrays(np.asarray(keys, np.int64), np.asarray(tokens, np.int64))
        out = np.full(keys.shape, -1, dtype=np.int64)
        V = self.vocab_size
        ok = (keys >= 0) & (keys < V) & (tokens >= 0) & (tokens < V)
        code = keys[ok] * V + tokens[ok]
        pos = np.searchsorted(self.node_code, code).clip(max=self.node_code.size - 1)
        out[ok] = np.where(self.node_code[pos] == code, self.node_comp[pos], -1)
        return out

    def components(self, k: int) -> list[Int[np.ndarray, " size"]]:
        """SCCs of G(k) as sorted token arrays, in priority order.

        Sorted by level (longest path from a top component in the condensation DAG, so
        every component comes after all components that outrank it), then by smallest
        token; components on the same level are incomparable.
        """
        sl = self._slice(k)
        if sl.start == sl.stop:
            raise KeyError(f"no sample has last token {k}; known last tokens are in .keys")
        comps, toks = self.node_comp[sl], self.node_code[sl] - k * self.vocab_size
        uniq, first, idx = np.unique(comps, return_index=True, return_inverse=True)
        level = self._levels(uniq)[idx]
        # Tokens are sorted inside the slice, so a component's first node is its smallest token.
        order = np.lexsort((toks, toks[first][idx], level))
        comps, toks = comps[order], toks[order]
        return np.split(toks, np.flatnonzero(np.diff(comps)) + 1)

    def _levels(self, comps: Int[np.ndarray, " m"]) -> Int[np.ndarray, " m"]:
        """Priority level of each of ``comps`` (sorted, closed under the DAG's edges)."""
        succ = _ranges(self.dag.indptr[comps], self.dag.indptr[comps + 1])
        src = np.repeat(np.arange(comps.size), np.diff(self.dag.indptr)[comps])
        dst = np.searchsorted(comps, self.dag.indices[succ])
        return _longest_path_levels(comps.size, src, dst)

    def has_cycle(self, k: int | None = None) -> bool:
        """Whether G(k) (or, with ``k=None``, any graph) has an SCC with two or more tokens."""
        if k is None:
            return bool((self.comp_size > 1).any())
        return bool((self.comp_size[self.node_comp[self._slice(k)]] > 1).any())

    def reaches(self, k: int, a: int, b: int) -> bool:
        """Whether G(k) has a path ``a -> b`` (a outranks b, or they share an SCC)."""
        na, nb = self._node_ids(k, np.array([a, b]))
        if na < 0 or nb < 0:
            return False
        ca, cb = self.node_comp[na], self.node_comp[nb]
        return bool(ca == cb or np.isin(cb, self._reachable(np.array([ca]))))

    def _reachable(self, comps: Int[np.ndarray, " m"]) -> Int[np.ndarray, " r"]:
        """Components reachable from ``comps`` by paths of length >= 1 (frontier BFS)."""
        indptr, indices = self.dag.indptr, self.dag.indices
        seen = np.zeros(0, dtype=np.int64)
        frontier = _unique(np.asarray(comps, dtype=np.int64))
        while frontier.size:
            nxt = _unique(indices[_ranges(indptr[frontier], indptr[frontier + 1])].astype(np.int64))
            frontier = np.setdiff1d(nxt, seen, assume_unique=True)
            seen = np.union1d(seen, frontier)
        return seen

    def retrieval_components(self, seq: Int[np.ndarray, " T"], last: int | None = None) -> list[Int[np.ndarray, " m"]]:
        """Maximal components present in ``seq`` (restricted to the tokens present).

        ``last`` is the query token; by default ``seq[-1]``.  More than one array
        means the graph leaves the top of this input ambiguous (see module docstring).
        """
        seq = np.asarray(seq, dtype=np.int64).ravel()
        if seq.size == 0:
            return []
        k = int(seq[-1]) if last is None else int(last)
        present = _unique(seq)
        ids = self._node_ids(k, present)
        present, ids = present[ids >= 0], ids[ids >= 0]
        comps = self.node_comp[ids]
        # A present component is dominated iff another present one reaches it; the
        # condensation is acyclic, so "reachable from the present set" is exactly that.
        top = np.setdiff1d(comps, self._reachable(comps))
        return [present[comps == c] for c in top]

    def retrieval_set(self, seq: Int[np.ndarray, " T"], last: int | None = None) -> Int[np.ndarray, " m"]:
        """Tokens of ``seq`` in the highest-priority component(s) of G(last) present.

        The union over all maximal present components when they are incomparable.
        """
        parts = self.retrieval_components(seq, last)
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (last_token, token) with its SCC (numbered in priority order inside
        G(last_token)), the SCC's size and its priority level (0 = nothing outranks it)."""
        key, token = np.divmod(self.node_code, self.vocab_size)
        level = _longest_path_levels(self.comp_size.size, *_coo(self.dag))[self.node_comp]
        df = pd.DataFrame(
            {
                "last_token": key,
                "token": token,
                "component": 0,
                "component_size": self.comp_size[self.node_comp],
                "level": level,
            }
        )
        # Number the SCCs of each graph as components(k) lists them: by level, then smallest token.
        first_token = df.groupby(self.node_comp)["token"].transform("min")
        order_key = pd.Series(level * self.vocab_size + first_token)
        df["component"] = order_key.groupby(key).rank(method="dense").astype(np.int64) - 1
        return df

    def __repr__(self) -> str:
        return (
            f"PriorityGraphs(graphs={self.keys.size}, nodes={self.node_code.size}, edges={self.n_edges}, "
            f"components={self.comp_size.size}, cyclic_components={(self.comp_size > 1).sum()})"
        )


def _coo(m: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr)), m.indices.astype(np.int64)


def _longest_path_levels(n: int, src: np.ndarray, dst: np.ndarray) -> Int[np.ndarray, " n"]:
    """Level of each DAG node = longest path from any source (layered Kahn's algorithm).

    Vectorised over all graphs at once; the loop runs once per level, not per node.
    """
    level = np.zeros(n, dtype=np.int64)
    indeg = np.bincount(dst, minlength=n)
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    indptr = np.searchsorted(src, np.arange(n + 1))
    frontier = np.flatnonzero(indeg == 0)
    depth = 0
    while frontier.size:
        level[frontier] = depth
        succ = dst[_ranges(indptr[frontier], indptr[frontier + 1])]
        indeg -= np.bincount(succ, minlength=n)
        cand = _unique(succ)
        frontier = cand[indeg[cand] == 0]
        depth += 1
    return level
