"""Association capability beyond the matrix cells (tests/architectures_association.py holds the
swap / downstream / association_bias columns of tests/architectures.py): the whole-prefix
option against a reference without the window, the probed pattern route, and MPT (ALiBi),
which the matrix's families do not include."""

import pytest
import torch
from tolerance import run_tols


import embedwalk as ew
from architectures_association import Reference, heads_of, hf_logprobs, model_logprobs
from embedwalk.association import UniformSwap
from embedwalk.errors import EmbedwalkError
from embedwalk.testing import installed_generation, matrix_case, matrix_modes


def _batch():
    from architectures import padded

    return padded("left")


WINDOWED = [(f, m) for f in ("mistral", "gpt_neo") for m in matrix_modes(f) if m != "compat"]


@pytest.mark.parametrize("family,mode", WINDOWED, ids=[f"{f}-{m}" for f, m in WINDOWED])
def test_prefix_keys_ignore_the_window(family, mode):
    """keys="prefix" averages over every earlier valid key: it equals the reference run of the
    same weights with the window removed, and differs from the default (reachable keys)."""
    import copy

    model, hf = matrix_case(family, mode)
    a = ew.adapt(model)
    assert any(a.attention_window(l) for l in range(a.n_layers))
    unwindowed = copy.deepcopy(hf)
    if family == "mistral":
        unwindowed.config.sliding_window = None
    else:  # GPT-Neo keeps its local mask in a buffer of each local attention
        for module in unwindowed.modules():
            if getattr(module, "attention_type", None) == "local" and "bias" in module._buffers:
                module.bias.copy_(torch.tril(torch.ones_like(module.bias)))
    tokens, mask = _batch()
    with Reference(unwindowed).swapped(heads_of("all", a.n_layers, a.n_heads)):
        want = hf_logprobs(unwindowed, tokens, mask)
    for method in ("fast", "pattern"):
        prefix = model_logprobs(model, tokens, mask, [UniformSwap(method=method, keys="prefix")])
        reachable = model_logprobs(model, tokens, mask, [UniformSwap(method=method)])
        tol = run_tols(model, tokens, mask, [UniformSwap(method=method, keys="prefix")])["logprob"]
        assert float((prefix - want)[mask].abs().max()) <= tol
        assert float((prefix - reachable)[mask].abs().max()) > 10 * tol
    with pytest.raises(EmbedwalkError, match="keys must be"):
        UniformSwap(keys="window")


def test_pattern_route_is_probed_not_listed():
    """The probe finds the bridge classes whose hook_pattern fires after the module used its
    pattern (OPT, GPT-Neo, GPT-J, XGLM) from the model's behaviour alone."""
    from embedwalk.association.probes import attention_routes

    for family in ("opt", "gpt2", "mistral"):
        for mode in matrix_modes(family):
            try:
                a = ew.adapt(matrix_case(family, mode)[0])
            except EmbedwalkError:
                continue
            routes = attention_routes(a)
            expected = not (family == "opt" and mode != "hooked")
            assert routes.pattern_reaches_z == (expected,) * a.n_layers, (family, mode, routes)
            assert all(routes.v_before_z) and all(routes.pattern_fires)


@pytest.mark.skipif(installed_generation() != "bridge", reason="TL 3.9 has no MPT converter")
def test_mpt_alibi_bypass():
    """MPT (ALiBi, fused QKV; not in the matrix's families): fast (bypassed) and pattern swaps
    equal the HF reference."""
    import copy

    import transformers

    from embedwalk.models import wrap
    from embedwalk.testing import tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=200,
                                    initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    config.architectures = ["MptForCausalLM"]
    hf = transformers.MptForCausalLM(config).eval()
    model = wrap(copy.deepcopy(hf), tiny_tokenizer(), generation="bridge", name="tiny-mpt")
    a = ew.adapt(model)
    tokens, mask = _batch()
    with Reference(hf).swapped(heads_of("all", a.n_layers, a.n_heads)):
        want = hf_logprobs(hf, tokens, mask)
    assert float((want - hf_logprobs(hf, tokens, mask))[mask].abs().max()) > 0.05
    fast = UniformSwap()
    tol = run_tols(model, tokens, mask, [UniformSwap(method="pattern")])["logprob"]
    for swap in (fast, UniformSwap(method="pattern")):
        assert float((model_logprobs(model, tokens, mask, [swap]) - want)[mask].abs().max()) <= tol
    assert fast.bypassed_layers(a) == {0, 1}
