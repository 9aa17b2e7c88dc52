"""Vectors from a model for concept experiments, checked against run_with_cache and the weights."""

import pytest
import torch

import embedwalk as ew
from embedwalk.concepts.features import (
    REDUCTIONS,
    context_vectors,
    reduce_positions,
    segment_vectors,
    token_vectors,
)
from embedwalk.errors import EmbedwalkError

TEXTS = ["w5 w6 w7 w8 w9", "w9 w10", "w3 w4 w5 w11"]


def _cache(model, text):
    a = ew.adapt(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(a.to_tokens(text)[None])
    return cache


def _stack(model, cache):
    a = ew.adapt(model)
    names = ["hook_embed"] + [a.hook("resid_post", l) for l in range(a.n_layers)]
    return torch.stack([cache[n][0] for n in names], 0)  # [points, pos, d]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_context_vectors_equal_run_with_cache(tiny, padding_side):
    # the padding side is the tokenizer's; both must give the vectors of one-by-one caches
    old = tiny.tokenizer.padding_side
    tiny.tokenizer.padding_side = padding_side
    try:
        got = context_vectors(tiny, TEXTS, batch_size=3)
        at1 = context_vectors(tiny, TEXTS, positions=[1, 1, -2], batch_size=3)
    finally:
        tiny.tokenizer.padding_side = old
    assert got.points[0] == "embed" and len(got.points) == ew.adapt(tiny).n_layers + 1
    for i, t in enumerate(TEXTS):
        ref = _stack(tiny, _cache(tiny, t))
        assert torch.allclose(got.vectors[i], ref[:, -1], atol=1e-5)
        pos = 1 if i < 2 else ref.shape[1] - 2
        assert torch.allclose(at1.vectors[i], ref[:, pos], atol=1e-5)


def test_reductions_equal_manual(tiny_arch):
    a = ew.adapt(tiny_arch)
    for how in REDUCTIONS:
        got = segment_vectors(tiny_arch, TEXTS, how, batch_size=2)
        for i, t in enumerate(TEXTS):
            ref = _stack(tiny_arch, _cache(tiny_arch, t)).double()[:, 1:]  # BOS left out
            n = ref.shape[1]
            if how == "mean":
                want = ref.mean(1)
            elif how == "last":
                want = ref[:, -1]
            else:
                w = torch.arange(1, n + 1, dtype=torch.float64)
                want = (ref * (w / w.sum())[None, :, None]).sum(1)
            assert torch.allclose(got.vectors[i].double(), want, atol=1e-5), (how, i)
    assert a.n_layers + 1 == got.vectors.shape[1]


def test_reduce_positions_skips_masked_rows():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    mean = reduce_positions(x, mask, "mean")
    assert torch.allclose(mean[0], x[0, :2].mean(0)) and torch.allclose(mean[1], x[1, 1:].mean(0))
    assert torch.allclose(reduce_positions(x, mask, "last")[1], x[1, 3])
    w = reduce_positions(x, mask, "weighted")
    assert torch.allclose(w[1], (x[1, 1] + 2 * x[1, 2] + 3 * x[1, 3]) / 6, atol=1e-6)
    with pytest.raises(EmbedwalkError):
        reduce_positions(x, mask, "median")


def test_token_vectors_are_weight_rows(tiny):
    a = ew.adapt(tiny)
    emb = token_vectors(tiny, ["w5", "w7 w9"], "embed")
    assert emb.token_ids == [[5], [7, 9]]
    assert torch.allclose(emb.vectors[0], a.W_E[5].float())
    assert torch.allclose(emb.vectors[1], (a.W_E[7] + a.W_E[9]).float() / 2, atol=1e-6)
    un = token_vectors(tiny, ["w5"], "unembed")
    assert torch.allclose(un.vectors[0], a.W_U[:, 5].float())
    with pytest.raises(EmbedwalkError):
        token_vectors(tiny, ["w5"], "pos")


def test_smollm2_vectors(smollm2):
    a = ew.adapt(smollm2)
    tv = token_vectors(smollm2, ["cat"], "unembed")
    assert tv.token_ids[0] == a.to_tokens(" cat", prepend_bos=False).tolist()
    assert torch.allclose(tv.vectors[0], a.W_U[:, tv.token_ids[0][0]].float())
    text = "The cats sat on the mat"
    got = context_vectors(smollm2, [text, "A dog"])
    ref = _stack(smollm2, _cache(smollm2, text))
    assert torch.allclose(got.vectors[0], ref[:, -1], atol=1e-4)
    df = got.to_dataframe()
    assert set(df.columns) >= {"prompt", "point", "norm"}
