"""Token-priority graphs: SCCs against networkx, priority order and retrieval sets."""

import networkx as nx
import numpy as np
import pytest

from embedwalk.priority import build_priority_graphs


def _nx_graphs(seqs, labels):
    """The paper's definition, written the slow obvious way: one DiGraph per last token."""
    graphs = {}
    for X, y in zip(seqs.tolist(), labels.tolist()):
        G = graphs.setdefault(X[-1], nx.DiGraph())
        G.add_node(y)
        for j in X:
            G.add_node(j)
            if j != y:
                G.add_edge(y, j)
    return graphs


@pytest.mark.parametrize("seed", range(8))
def test_sccs_and_retrieval_match_networkx(seed):
    rng = np.random.default_rng(seed)
    n, T, V = rng.integers(10, 80), rng.integers(2, 6), rng.integers(3, 10)
    seqs, labels = rng.integers(0, V, (n, T)), rng.integers(0, V, n)
    pg = build_priority_graphs(seqs, labels)
    ref = _nx_graphs(seqs, labels)
    assert sorted(pg.keys.tolist()) == sorted(ref)
    for k, G in ref.items():
        want = sorted(sorted(c) for c in nx.strongly_connected_components(G))
        got = sorted(c.tolist() for c in pg.components(k))
        assert got == want
        assert pg.has_cycle(k) == any(len(c) > 1 for c in want)
        # components(k) is in priority order: nothing listed later reaches something earlier.
        comps = pg.components(k)
        for i, a in enumerate(comps):
            for b in comps[i + 1 :]:
                assert not nx.has_path(G, int(b[0]), int(a[0]))
        # Retrieval: present tokens that no other present, non-equivalent token reaches.
        for _ in range(6):
            s = rng.integers(0, V, T)
            s[-1] = k
            present = sorted({t for t in s.tolist() if t in G})
            top = [
                t for t in present
                if not any(nx.has_path(G, u, t) and not nx.has_path(G, t, u) for u in present)
            ]
            assert pg.retrieval_set(s).tolist() == top


def test_hand_built_priorities_and_ambiguity():
    # Last token 9 everywhere.  Edges: 1->2, 2->1 (SCC {1,2}), 1->3, 3->4, 5->4, and every
    # label -> 9 (the query token is part of the input), so 4 and 9 are both sinks.
    seqs = np.array([[2, 9, 9], [1, 9, 9], [3, 9, 9], [4, 9, 9], [4, 4, 9]])
    labels = np.array([1, 2, 1, 3, 5])
    pg = build_priority_graphs(seqs, labels)
    # Level = longest path from a source: {1,2}, {5} -> 0; 3 -> 1; 4 and 9 -> 2.
    assert [c.tolist() for c in pg.components(9)] == [[1, 2], [5], [3], [4], [9]]
    assert pg.reaches(9, 1, 4) and pg.reaches(9, 2, 1) and not pg.reaches(9, 4, 3)
    assert pg.retrieval_set([3, 4, 9]).tolist() == [3]
    assert pg.retrieval_set([4, 2, 1, 3, 9]).tolist() == [1, 2]  # a whole SCC comes back
    # {1,2} and {5} are incomparable: both are returned, as two components.
    parts = pg.retrieval_components([2, 5, 4, 9])
    assert sorted(p.tolist() for p in parts) == [[2], [5]]
    assert pg.retrieval_set([2, 5, 4, 9]).tolist() == [2, 5]
    # Unseen tokens carry no priority; an unseen query token has no graph.
    assert pg.retrieval_set([7, 3, 4, 9]).tolist() == [3]
    assert pg.retrieval_set([4, 9]).tolist() == [4, 9]  # two incomparable sinks
    assert pg.retrieval_set([1, 2, 3]).size == 0
    df = pg.to_dataframe()
    row = df[(df.last_token == 9) & (df.token == 4)].iloc[0]
    assert row.component_size == 1 and row.level == 2 and row.component == 3
    assert set(df[df.token.isin([1, 2])].component_size) == {2}


def test_mask_defines_the_last_token():
    seqs = np.array([[5, 1, 0, 0], [1, 5, 2, 7]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    pg = build_priority_graphs(seqs, np.array([5, 1]), mask=mask)
    assert pg.keys.tolist() == [1, 2]  # last unmasked tokens; 0 and 7 are padding
    assert [c.tolist() for c in pg.components(2)] == [[1], [2], [5]]
    assert pg.reaches(2, 1, 5) and pg.reaches(2, 1, 2) and not pg.reaches(2, 5, 1)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="labels must have shape"):
        build_priority_graphs(np.zeros((3, 4), int), np.zeros(2, int))
    with pytest.raises(ValueError, match="2-D"):
        build_priority_graphs(np.zeros(4, int), np.zeros(1, int))
    with pytest.raises(ValueError, match="vocab_size"):
        build_priority_graphs(np.array([[1, 5]]), np.array([1]), vocab_size=3)
    with pytest.raises(ValueError, match="integer"):
        build_priority_graphs(np.zeros((2, 2)), np.zeros(2, int))
    with pytest.raises(KeyError, match="no sample has last token"):
        build_priority_graphs(np.array([[1, 2]]), np.array([1])).components(1)


def test_scales_without_python_loops():
    # 200k samples should take well under a few seconds; the assertion is on the result,
    # the size only guards against an accidental per-sample loop making this test crawl.
    rng = np.random.default_rng(0)
    n, T, V = 200_000, 8, 5_000
    seqs = rng.integers(0, V, (n, T))
    labels = seqs[np.arange(n), rng.integers(0, T, n)]
    pg = build_priority_graphs(seqs, labels, vocab_size=V)
    edges = {(a, y, j) for a, y, j in zip(seqs[:50, -1], labels[:50], seqs[:50, 0]) if j != y}
    assert pg.n_edges <= n * (T - 1)
    for k, y, j in edges:
        assert pg.reaches(int(k), int(y), int(j))
