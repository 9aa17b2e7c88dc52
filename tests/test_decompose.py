"""The decomposition lens: parts sum to the residual, DLAs sum to the logit, heads split by source."""

import pytest
import torch

import embedwalk as ew
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses.decompose import decompose
from embedwalk.models import wrap
from embedwalk.testing import installed_generation, tiny_hf, tiny_tokenizer
from tolerance import dot_tol, logit_scale, logit_tol, resid_rel, resid_tol

TEXT = "w5 w6 w7 w8 w9"
GEN = installed_generation()


@pytest.fixture(scope="module", params=["gpt2", "llama"] + (["gpt2-compat"] if GEN == "bridge" else []))
def biased(request):
    """A tiny model whose biases (b_V, b_O, MLP out, norms) are all non-zero, unlike a fresh init."""
    arch = request.param.split("-")[0]
    hf = tiny_hf(arch, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model = wrap(hf, tiny_tokenizer(), generation=GEN, device="cpu")
    if request.param.endswith("compat"):
        model.enable_compatibility_mode()
    return model


def _rel(x, y):
    return float((torch.as_tensor(x, dtype=torch.float64) - torch.as_tensor(y, dtype=torch.float64)).abs().max()
                 / torch.as_tensor(y, dtype=torch.float64).abs().max().clamp_min(1e-12))


def _check(model, layer, stage, position):
    a = ew.adapt(model)
    toks = a.to_tokens(TEXT)[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    res = decompose(model, TEXT, layer=layer, stage=stage, position=position)
    q = position % toks.shape[1]
    layer %= a.n_layers
    want = cache[a.hook(f"resid_{stage}", layer)][0, q]
    assert torch.allclose(res.residual, want, atol=resid_tol(a, want), rtol=0)
    # the parts are the model's sums regrouped: each sublayer's dot products round differently
    # (tests/tolerance.py); relative_error is a ratio of norms, up to sqrt(d) times a ratio of maxima
    rel = resid_rel(a)
    assert res.relative_error <= rel * a.d_model**0.5
    assert _rel(res.reconstruction, want) <= rel
    # DLA with the frozen scale sums to the readout logit of that very vector
    with torch.no_grad():
        lens_logit = float(a.readout(want)[res.token])
    dla_tol = logit_tol(a, want) + 2 * rel * logit_scale(a, want)
    assert abs(res.dla_total - lens_logit) <= dla_tol
    assert abs(res.to_dataframe(by_source=True).dla.sum() - lens_logit) <= dla_tol
    if layer == a.n_layers - 1 and stage == "post":
        assert res.token == int(logits[0, q].argmax())
        own = float(logits[0, q, res.token])
        assert abs(res.dla_total - own) <= dla_tol
    # heads (+ b_O) reproduce hook_attn_out; sources reproduce each head; sources follow pattern x v x W_O
    for li, l in enumerate(res.head_layers):
        idx = [i for i, (k, pl) in enumerate(zip(res.kinds, res.part_layers)) if pl == l and k in ("head", "attn_bias")]
        assert _rel(res.parts[idx].sum(0), cache[a.hook("attn_out", l)][0, q]) <= rel
        heads = [i for i in idx if res.kinds[i] == "head"]
        src = res.source_parts[li]  # [head, source, d_model]
        pat = cache[a.hook("pattern", l)][0, :, q]
        v = cache[a.hook("v", l)][0].repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        manual = pat[:, : q + 1, None, None] * v[: q + 1].transpose(0, 1)[..., None] * a.W_O(l).detach()[:, None]
        terms = manual.abs().sum(-2)  # [head, source, d_model]: sum_i |pattern v_i W_O[i]|
        assert ((src - manual.sum(-2)).abs() <= dot_tol(terms, a.d_head)).all()
        # a head's part is z W_O with z = sum_s pattern_s v_s: the same (q+1) d_head terms regrouped
        assert ((src.sum(1) - res.parts[heads]).abs() <= dot_tol(terms.sum(1), (q + 1) * a.d_head)).all()
        sdla = res.source_dla[li]
        assert ((sdla.sum(-1) - res.dla[heads]).abs() <= dot_tol(sdla.abs().sum(-1), q + 1)).all()
    return res


@pytest.mark.parametrize("stage", ["pre", "mid", "post"])
def test_parts_sum_on_fixtures(tiny, stage):
    _check(tiny, -1, stage, -1)
    _check(tiny, 0, stage, 2)


def test_parts_sum_with_biases(biased):
    a = ew.adapt(biased)
    res = _check(biased, -1, "post", -2)
    kinds = set(res.kinds)
    assert ("pos_embed" in kinds) == a.has_pos_embed
    if a.has_pos_embed:  # GPT-2: every bias term is a row of its own
        assert {"attn_bias", "mlp_bias"} <= kinds
        # the MLP row is the bias-free product of its hidden activations with W_out
        with torch.no_grad():
            _, cache = biased.run_with_cache(a.to_tokens(TEXT)[None])
        for l in range(a.n_layers):
            i = next(i for i, (k, pl) in enumerate(zip(res.kinds, res.part_layers)) if k == "mlp" and pl == l)
            post, W_out = cache[f"blocks.{l}.mlp.hook_post"][0, -2], biased.blocks[l].mlp.W_out.detach()
            want = post @ W_out
            assert ((res.parts[i] - want).abs() <= dot_tol(post.abs() @ W_out.abs(), W_out.shape[0])).all()
    totals = res.layer_totals()
    others = res.dla[[i for i, k in enumerate(res.kinds) if k in ("embed", "pos_embed")]]
    total = totals.aggregation_dla.sum() + totals.filtering_dla.sum() + float(others.sum()) + res.norm_bias_dla + res.unembed_bias_dla
    # the same DLAs summed in another grouping: float32 sums of len(dla) terms
    assert abs(total - res.dla_total) <= float(dot_tol(res.dla.abs().sum() + abs(res.norm_bias_dla) + abs(res.unembed_bias_dla), len(res.dla)))


def test_chosen_token_and_errors(tiny_arch):
    a = ew.adapt(tiny_arch)
    res = decompose(tiny_arch, TEXT, token="w9", by_source=False)
    assert res.token == 9 and res.source_parts is None
    df = res.to_dataframe()
    assert list(df.columns) == ["kind", "layer", "head", "source_pos", "source_token", "norm", "dla"]
    assert (df.kind == "head").sum() == a.n_layers * a.n_heads
    assert len(res.top(5)) == 5
    with pytest.raises(EmbedwalkError, match="out of range"):
        decompose(tiny_arch, TEXT, layer=a.n_layers)
    with pytest.raises(EmbedwalkError, match="position"):
        decompose(tiny_arch, TEXT, position=40)
    with pytest.raises(EmbedwalkError, match="one prompt"):
        decompose(tiny_arch, [TEXT, TEXT])
    with pytest.raises(EmbedwalkError, match="not one"):
        decompose(tiny_arch, TEXT, token="w9 w10")
    with pytest.raises(EmbedwalkError, match="stage"):
        decompose(tiny_arch, TEXT, stage="end")
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    plt.close(res.plot())


def test_smollm2_decomposition(smollm2):
    a = ew.adapt(smollm2)
    text = "The capital of France is"
    res = decompose(smollm2, text, token=" Paris")
    rel = resid_rel(a)  # tests/tolerance.py
    assert res.relative_error <= rel * a.d_model**0.5
    toks = a.to_tokens(text)[None]
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(toks)
    own = float(logits[0, -1, a.token_id(" Paris")])
    final = cache[a.final_resid_hook][0, -1]
    assert abs(res.dla_total - own) <= logit_tol(a, final) + 2 * rel * logit_scale(a, final)
    assert res.source_parts.shape == (a.n_layers, a.n_heads, toks.shape[1], a.d_model)
    # GQA: 9 query heads read 3 value heads; sources still add up to each head
    heads = [i for i, k in enumerate(res.kinds) if k == "head"]
    src = res.source_parts
    terms = []  # per head: sum over sources and d_head of |pattern v W_O|, the scale of its rounding
    for l in range(a.n_layers):
        pat = cache[a.hook("pattern", l)][0, :, -1]  # [head, source]
        v = cache[a.hook("v", l)][0].repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)  # [source, head, d_head]
        terms.append(torch.einsum("hs,shi,hid->hd", pat.abs(), v.abs(), a.W_O(l).detach().abs()))
    tol = dot_tol(torch.cat(terms), toks.shape[1] * a.d_head)
    assert ((src.sum(2).reshape(-1, a.d_model) - res.parts[heads]).abs() <= tol).all()


def test_bfloat16_accumulates_in_float32_and_reports_the_gap():
    """16-bit: the parts and DLAs are float32/float64, checked against a float64 recomputation
    from the same bfloat16 weights; what the model's own rounding leaves is reported, and the
    dataframe's DLA column (with its ``rounding`` row) sums to the logit."""
    hf = tiny_hf("gpt2", seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norm weights and biases, as in ``biased``
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    hf = hf.to(torch.bfloat16)
    model = wrap(hf, tiny_tokenizer(), generation=GEN, device="cpu")
    res = decompose(model, TEXT, by_source=False)
    assert res.dtype == "bfloat16" and res.parts.dtype == torch.float32 and res.dla.dtype == torch.float32
    x, P = res.residual.double(), res.parts.double()
    gap = float((P.sum(0) - x).norm() / x.norm())
    assert res.residual_gap == pytest.approx(gap, rel=1e-9) and res.relative_error == pytest.approx(gap, rel=1e-9)
    assert 1e-5 < res.residual_gap < 2e-2  # bfloat16's own rounding: far above float32's, well below 1
    assert res.logit_gap == pytest.approx(res.logit - res.dla_total, abs=1e-12)
    df = res.to_dataframe()
    assert df[df.kind == "rounding"].dla.item() == pytest.approx(res.logit_gap)
    assert abs(df.dla.sum() - res.logit) < 1e-6
    # independent: LayerNorm with its scale frozen at x, in float64, from the HF module's weights
    ln, W_U = hf.transformer.ln_f, hf.lm_head.weight.detach().double()
    w, b = ln.weight.detach().double(), ln.bias.detach().double()
    gain = w / ((x - x.mean()).pow(2).mean() + ln.eps).sqrt()
    want = ((P - P.mean(-1, keepdim=True)) * gain) @ W_U[res.token]
    # a TL 4 bridge's norm runs in float32 on float32 input, so the frozen norm is float32-exact;
    # TL 3 norms round to the model dtype inside, which the probe cannot undo
    tol = 1e-5 if GEN == "bridge" else 1e-2
    assert (res.dla.double() - want).abs().max() <= tol * want.abs().max()
    assert abs(res.norm_bias_dla - float(b @ W_U[res.token])) <= tol * abs(float(b @ W_U[res.token])) + 1e-6
