"""The adapter: sizes, hook names, the final readout and clear errors, on both TL generations."""

import pytest
import torch

import embedwalk as ew
from embedwalk.errors import EmbedwalkError
from tolerance import logprob_tol


def _own_logprobs(model, tokens):
    """The exact log-probs of the model's own logits (a float64 log-softmax)."""
    with torch.no_grad():
        return model(tokens).double().log_softmax(-1)


def _final_resid(model, adapter, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[adapter.final_resid_hook])
    return cache[adapter.final_resid_hook]


def test_readout_reproduces_model_logprobs(tiny):
    a = ew.adapt(tiny)
    tokens = torch.randint(2, a.d_vocab, (2, 9))
    resid = _final_resid(tiny, a, tokens)
    with torch.no_grad():
        mine = a.readout(resid).double().log_softmax(-1)
    own = _own_logprobs(tiny, tokens)
    assert (mine - own).abs().max() <= logprob_tol(a, resid, own)


def test_final_norm_recomputes_statistics(tiny):
    """A vector scaled by 7 must be normalised with its own statistics, not a cached scale."""
    a = ew.adapt(tiny)
    x = torch.randn(3, a.d_model)
    with torch.no_grad():
        assert torch.allclose(a.final_norm(7.0 * x), a.final_norm(x), atol=1e-4)
        assert not torch.allclose(a.final_norm(x), x, atol=1e-3)


def test_sizes_and_hooks(tiny):
    a = ew.adapt(tiny)
    assert (a.n_layers, a.d_model, a.n_heads) == (2, 64, 4)
    assert a.n_kv_heads == (2 if a.has_pos_embed is False else 4)
    assert a.W_U.shape == (64, a.d_vocab) and a.W_E.shape == (a.d_vocab, 64)
    points = a.readout_points(mid=True)
    assert [p.label for p in points] == ["embed", "0.mid", "0", "1.mid", "1"]
    for p in points:
        assert p.hook in tiny.hook_dict
    assert a.W_O(1).shape == (4, 16, 64)
    assert a.hook("pattern", -1) == "blocks.1.attn.hook_pattern"


def test_bad_layer_and_token_errors(tiny):
    a = ew.adapt(tiny)
    with pytest.raises(EmbedwalkError, match="out of range"):
        a.hook("resid_post", 5)
    with pytest.raises(EmbedwalkError, match="not one"):
        a.token_id("w5 w6")
    with pytest.raises(EmbedwalkError, match="outside the vocabulary"):
        a.token_id(10_000)
    assert a.token_id("w7") == 7


def test_non_tl_model_is_refused():
    with pytest.raises(EmbedwalkError, match="hook points"):
        ew.adapt(torch.nn.Linear(3, 3))
    with pytest.raises(EmbedwalkError, match="TransformerLens model"):
        ew.adapt("gpt2")


def test_smollm2_readout_and_paris(smollm2):
    a = ew.adapt(smollm2)
    assert (a.n_layers, a.d_model, a.n_heads, a.n_kv_heads, a.d_vocab) == (30, 576, 9, 3, 49152)
    tokens = a.to_tokens("The capital of France is")[None]
    resid = _final_resid(smollm2, a, tokens)
    with torch.no_grad():
        mine = a.readout(resid).double().log_softmax(-1)
    own = _own_logprobs(smollm2, tokens)
    assert (mine - own).abs().max() <= logprob_tol(a, resid, own)
    with torch.no_grad():
        nxt = smollm2(tokens)[0, -1].argmax().item()
    assert a.to_str_tokens([nxt])[0] == " Paris"


def test_tolerance_still_catches_a_wrong_readout(smollm2):
    """The rounding-derived tolerance (tests/tolerance.py) is far below what a wrong readout
    gives: the final norm applied with the final layer's cached scale instead of statistics
    recomputed for the vector read (TransformerLens's ``accumulated_resid(apply_ln=True)`` bug),
    and a readout one block off."""
    a = ew.adapt(smollm2)
    tokens = a.to_tokens("The capital of France is")[None]
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(tokens)
        final = cache[a.final_resid_hook]

        def rms(x):
            return x.double().pow(2).mean(-1, keepdim=True).sqrt()

        for layer in (0, a.n_layers // 2, a.n_layers - 2):
            x = cache[a.hook("resid_post", layer)]
            right = a.readout(x).double().log_softmax(-1)
            # RMSNorm is scale-invariant, so the cached-scale variant is norm(x) * rms(x) / rms(final)
            cached = ((a.final_norm(x).double() * (rms(x) / rms(final))) @ a.W_U.double()).log_softmax(-1)
            assert (cached - right).abs().max() > 100 * logprob_tol(a, x, right), layer
        own = logits.double().log_softmax(-1)
        off = a.readout(cache[a.hook("resid_pre", a.n_layers - 1)]).double().log_softmax(-1)
        assert (off - own).abs().max() > 100 * logprob_tol(a, final, own)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_read_in_their_dtype(dtype):
    from conftest import GENERATION
    from embedwalk.testing import tiny_model

    model = tiny_model("llama", GENERATION, dtype=dtype)
    a = ew.adapt(model)
    assert a.dtype == dtype
    tokens = torch.randint(2, a.d_vocab, (2, 7))
    resid = _final_resid(model, a, tokens)
    assert resid.dtype == dtype
    with torch.no_grad():
        mine = a.readout(resid)
        own = model(tokens)
    assert mine.dtype == dtype
    own_lp = own.double().log_softmax(-1)
    assert (mine.double().log_softmax(-1) - own_lp).abs().max() <= logprob_tol(a, resid, own_lp)
