"""The adapter: sizes, hook names, the final readout and clear errors, on both TL generations."""

import pytest
import torch

import embedwalk as ew
from embedwalk.errors import EmbedwalkError


def _own_logprobs(model, tokens):
    with torch.no_grad():
        return model(tokens).float().log_softmax(-1)


def _final_resid(model, adapter, tokens):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[adapter.final_resid_hook])
    return cache[adapter.final_resid_hook]


def test_readout_reproduces_model_logprobs(tiny):
    a = ew.adapt(tiny)
    tokens = torch.randint(2, a.d_vocab, (2, 9))
    with torch.no_grad():
        mine = a.readout(_final_resid(tiny, a, tokens)).float().log_softmax(-1)
    assert (mine - _own_logprobs(tiny, tokens)).abs().max() <= 1e-5


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
    with torch.no_grad():
        mine = a.readout(_final_resid(smollm2, a, tokens)).float().log_softmax(-1)
    assert (mine - _own_logprobs(smollm2, tokens)).abs().max() <= 1e-5
    with torch.no_grad():
        nxt = smollm2(tokens)[0, -1].argmax().item()
    assert a.to_str_tokens([nxt])[0] == " Paris"


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
    assert (mine.float().log_softmax(-1) - own.float().log_softmax(-1)).abs().max() <= 1e-5
