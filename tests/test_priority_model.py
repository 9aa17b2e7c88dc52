"""head_priority on real TransformerLens models equals scoring cached patterns directly."""

import math

import torch

import embedwalk as ew
from tolerance import dot_tol, resid_rel
from embedwalk.priority import graphs_from_tokens, head_priority, score_heads
from embedwalk.priority.model import _score_mask

TEXTS = [
    "w5 w6 w7 w5 w6 w8 w5 w6 w7 w9 w5",
    "w9 w10 w11 w9 w10 w12 w9",
    "w5 w7 w5 w7 w6 w5 w7",
]


def test_head_priority_matches_cached_patterns(tiny_arch):
    a = ew.adapt(tiny_arch)
    result = head_priority(tiny_arch, TEXTS, batch_size=2)
    # Independent: one padded batch, patterns from run_with_cache, scored in one call.
    tokens, mask = ew.tokenize(a, TEXTS)
    score_mask = _score_mask(a, tokens, mask, True)
    graphs = graphs_from_tokens(tokens, score_mask, vocab_size=a.d_vocab)
    with torch.no_grad():
        _, cache = tiny_arch.run_with_cache(tokens, attention_mask=mask.long())
    direct = score_heads({l: cache[a.hook("pattern", l)] for l in range(a.n_layers)}, tokens, score_mask, graphs)
    # batches of two against one batch of all: the residual moves by resid_rel, the attention
    # scores (q and k both) by twice that of their size, each pattern entry by at most
    # p * 2 max|d score|, so a pattern mass by at most 2 max|d score| (tests/tolerance.py)
    n = tokens.shape[1]
    real = mask[:, :, None] & mask[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril()  # scores the softmax saw
    scores = max(float(cache[a.hook("scores", l)].permute(0, 2, 3, 1)[real].abs().max()) for l in range(a.n_layers))
    mass_tol = 2 * 2 * resid_rel(a) * scores + float(dot_tol(1.0, tokens.shape[1]))
    for metric in ("mass", "uniform", "ratio", "spread"):
        got, want = result.scores[metric], direct.scores[metric]
        assert got.shape == (a.n_layers, a.n_heads)
        assert math.isfinite(mass_tol)
        tol = {"mass": mass_tol, "uniform": 0.0, "ratio": mass_tol / float(direct.scores["uniform"].min()),
               "spread": mass_tol * math.log(tokens.shape[1])}[metric]  # an entropy over <= T keys
        assert torch.allclose(got, want.to(got.dtype), atol=tol, rtol=0, equal_nan=True), metric
    assert (result.scores["n_positions"] > 0).all()
    df = result.to_dataframe()
    assert len(df) == a.n_layers * a.n_heads and {"layer", "head", "ratio"} <= set(df.columns)


def test_head_priority_on_smollm2(smollm2):
    text = ("the cat sat on the mat and the cat saw the dog and the dog sat on the cat. " * 2).strip()
    result = head_priority(smollm2, [text], layers=[0, 15, 29])
    ratio = result.scores["ratio"]
    assert ratio.shape == (3, 9)
    assert torch.isfinite(ratio).all()
    # mass and uniform are probabilities; at least one real head prefers the predicted tokens
    assert ((result.scores["mass"] >= 0) & (result.scores["mass"] <= 1 + 1e-9)).all()
    assert float(ratio.max()) > 1.0
    assert not math.isnan(float(result.scores["uniform"][0, 0]))
