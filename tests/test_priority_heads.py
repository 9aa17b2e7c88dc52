"""Head-level retrieval scores against a direct loop over batch, head and position."""

import math

import numpy as np
import pytest
import torch

from embedwalk.priority import build_priority_graphs, graphs_from_tokens, retrieval_mask, retrieval_scores, score_heads


def _batch(seed=0, B=3, P=10, V=6, H=4):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, -2:] = False  # right padding
    raw = torch.rand(B, H, P, P, generator=g) ** 4  # peaked, like real heads
    pattern = (raw * mask[:, None, None, :]).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True).clamp_min(1e-12)
    return tokens, mask, pattern


def _loop_scores(pattern, tokens, mask, graphs):
    """The definition, one (b, h, t) at a time."""
    B, H, P, _ = pattern.shape
    per_head = {h: {"mass": [], "uniform": [], "spread": []} for h in range(H)}
    for b in range(B):
        for t in range(P):
            if not mask[b, t]:
                continue
            keys = [s for s in range(t + 1) if mask[b, s]]
            toks = [int(tokens[b, s]) for s in keys]
            top = set(graphs.retrieval_set(np.array(toks), last=toks[-1]).tolist())
            in_top = [tok in top for tok in toks]
            if not any(in_top) or all(in_top):
                continue
            for h in range(H):
                p = np.array([float(pattern[b, h, t, s]) for s in keys])
                p = p / p.sum()
                mass = sum(pi for pi, it in zip(p, in_top) if it)
                per_head[h]["mass"].append(mass)
                per_head[h]["uniform"].append(sum(in_top) / len(keys))
                by_tok = {}
                for pi, tok, it in zip(p, toks, in_top):
                    if it:
                        by_tok[tok] = by_tok.get(tok, 0.0) + pi
                if len(by_tok) >= 2 and mass > 1e-12:
                    q = np.array(list(by_tok.values())) / mass
                    ent = -sum(x * math.log(x) for x in q if x > 0)
                    per_head[h]["spread"].append(ent / math.log(len(by_tok)))
    out = {}
    for key in ("mass", "uniform", "spread"):
        out[key] = np.array([np.mean(per_head[h][key]) if per_head[h][key] else np.nan for h in range(H)])
    out["n"] = len(per_head[0]["mass"])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_direct_loop(seed):
    tokens, mask, pattern = _batch(seed)
    graphs = graphs_from_tokens(tokens, mask, require_label_in_context=False)
    got = retrieval_scores(pattern, tokens, mask, graphs)
    want = _loop_scores(pattern, tokens, mask, graphs)
    assert want["n"] > 5 and int(got["n_positions"][0]) == want["n"]
    np.testing.assert_allclose(got["mass"].numpy(), want["mass"], rtol=1e-9)
    np.testing.assert_allclose(got["uniform"].numpy(), want["uniform"], rtol=1e-9)
    np.testing.assert_allclose(got["difference"].numpy(), want["mass"] - want["uniform"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["ratio"].numpy(), want["mass"] / want["uniform"], rtol=1e-9)
    np.testing.assert_allclose(got["spread"].numpy(), want["spread"], rtol=1e-9)


def test_ideal_and_uniform_heads():
    tokens, mask, _ = _batch(2)
    graphs = graphs_from_tokens(tokens, mask, require_label_in_context=False)
    R, scored = retrieval_mask(tokens, mask, graphs)
    causal = (mask[:, None, :] & torch.ones(10, 10, dtype=torch.bool).tril()).double()
    uniform = causal / causal.sum(-1, keepdim=True).clamp_min(1)
    ideal = R.double() / R.sum(-1, keepdim=True).clamp_min(1)
    pattern = torch.stack([uniform, ideal], dim=1)  # head 0 uniform, head 1 retrieves exactly
    res = score_heads([pattern, pattern.flip(1)], tokens, mask, graphs)
    ratio = res.scores["ratio"]
    assert ratio[0, 0] == pytest.approx(1.0) and ratio[1, 1] == pytest.approx(1.0)
    assert ratio[0, 1] > 1.5 and res.scores["mass"][0, 1] == pytest.approx(1.0)
    assert res.scores["difference"][0, 0] == pytest.approx(0.0, abs=1e-12)
    df = res.to_dataframe()
    assert list(df[["layer", "head"]].itertuples(index=False, name=None)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert df.loc[1, "mass"] == pytest.approx(1.0)


def test_graphs_from_tokens_equals_explicit_prefix_samples():
    tokens, mask, _ = _batch(3, P=8)
    toks, m = tokens.numpy(), mask.numpy()
    for require in (False, True):
        prefixes, labels = [], []
        for b in range(toks.shape[0]):
            for t in range(toks.shape[1] - 1):
                if not (m[b, t] and m[b, t + 1]):
                    continue
                prefix = [int(toks[b, s]) for s in range(t + 1) if m[b, s]]
                if require and int(toks[b, t + 1]) not in prefix:
                    continue
                prefixes.append(prefix)
                labels.append(int(toks[b, t + 1]))
        # Left-pad each prefix to length 8 and mask the padding out.
        seqs = np.array([[0] * (8 - len(p)) + p for p in prefixes])
        pad_mask = np.arange(8)[None, :] >= 8 - np.array([len(p) for p in prefixes])[:, None]
        want = build_priority_graphs(seqs, np.array(labels), mask=pad_mask, vocab_size=6)
        got = graphs_from_tokens(tokens, mask, require_label_in_context=require, vocab_size=6)
        assert np.array_equal(got.node_code, want.node_code) and got.n_edges == want.n_edges
        for k in got.keys:
            assert [c.tolist() for c in got.components(int(k))] == [c.tolist() for c in want.components(int(k))]
    # Requiring the label in context can only remove samples, hence edges.
    assert graphs_from_tokens(tokens, mask).n_edges <= graphs_from_tokens(tokens, mask, False).n_edges


def test_shape_errors_are_named():
    tokens, mask, pattern = _batch(0)
    graphs = graphs_from_tokens(tokens, mask, require_label_in_context=False)
    with pytest.raises(ValueError, match="batch, head, query_pos, key_pos"):
        retrieval_scores(pattern[0], tokens, mask, graphs)
    with pytest.raises(ValueError, match="mask shape"):
        retrieval_scores(pattern, tokens, mask[:, :5], graphs)
    with pytest.raises(ValueError, match="batch, pos"):
        graphs_from_tokens(tokens[0])
