"""Retraining with uniform aggregation: the attention function against explicit weights and the
TL swap writer, and a tiny end-to-end run."""

import torch

import embedwalk as ew
from embedwalk.association import UniformSwap
from embedwalk.association.retrain import RetrainConfig, build_model, prose_corpus, retrain, uniform_attention
from embedwalk.models import wrap
from embedwalk.testing import installed_generation, tiny_tokenizer

TINY = dict(layers=2, d_model=32, heads=4, kv_heads=2, d_mlp=64, ctx=16, batch=4, steps=6, eval_every=3,
            eval_windows=4, tokenizer="bytes")


def test_uniform_attention_is_explicit_uniform_weights():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    out, _ = uniform_attention(None, q, k, v, None)
    w = torch.ones(7, 7, dtype=torch.float64).tril()
    w = w / w.sum(-1, keepdim=True)
    want = (w @ v.double().repeat_interleave(2, dim=1)).transpose(1, 2)
    assert out.shape == (2, 7, 4, 8) and torch.allclose(out.double(), want, atol=1e-6)


def test_uniform_model_equals_tl_swap_of_same_weights():
    """The uniform-trained architecture is exactly the standard one with every head swapped."""
    cfg = RetrainConfig(**TINY)
    std = build_model(cfg, 200, uniform=False).eval()
    uni = build_model(cfg, 200, uniform=True).eval()
    assert all(torch.equal(p, q) for p, q in zip(std.parameters(), uni.parameters()))  # same seed, same init
    tl = wrap(std, tiny_tokenizer(), generation=installed_generation(), device="cpu", name="retrain-std")
    tokens = torch.randint(2, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    got = []
    ew.run(tl, tokens, writers=[UniformSwap()], on_logits=lambda lg, ctx: got.append(lg))
    with torch.no_grad():
        want = uni(tokens).logits
        plain = std(tokens).logits
    assert torch.allclose(torch.cat(got).log_softmax(-1), want.log_softmax(-1), atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_tiny_retrain_runs_and_is_reproducible():
    text = prose_corpus()[:20000]
    assert len(text) == 20000 and "the" in text and "    " not in text  # prose, not code blocks
    a = retrain(RetrainConfig(**TINY), text=text, device="cpu")
    b = retrain(RetrainConfig(**TINY), text=text, device="cpu")
    assert a.steps == [0, 3, 6] and len(a.standard) == len(a.uniform) == 3
    assert a.standard == b.standard and a.uniform == b.uniform  # same seed and data order
    assert a.standard[-1] < a.standard[0] and a.uniform[-1] < a.uniform[0]
    assert abs(a.gap - (a.uniform[-1] - a.standard[-1])) < 1e-12
    assert set(a.to_dataframe().attention) == {"standard", "uniform"}
    a.plot()
