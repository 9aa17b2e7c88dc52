"""Association-bias measurements against run_with_cache + float64 math and the model's own logits."""

import pytest
import torch

import embedwalk as ew
from embedwalk.association import UniformSwap, association_bias, downstream, sweep
from embedwalk.errors import EmbedwalkError
from tolerance import dot_tol, forward_tols, logit_tol, logprob_tol, resid_rel

SAME_LEN = ["w5 w6 w7 w8 w9 w10", "w3 w4 w5 w30 w31 w2"]
TEXTS = ["w5 w6 w7 w8 w9 w10 w11", "w9 w10", "w3 w4 w5 w30", "w20 w21 w22 w23 w24"]


def test_distance_cosine_self_bias_match_cache(tiny_arch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, SAME_LEN)
    assert mask.all()
    res = association_bias(tiny_arch, tokens)
    _, cache = tiny_arch.run_with_cache(tokens)
    n = tokens.shape[1]
    w = torch.ones(n, n, dtype=torch.float64).tril()
    w = w / w.sum(-1, keepdim=True)
    for layer in range(a.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"].double().reshape(*tokens.shape, a.n_kv_heads, a.d_head)
        z = cache[f"blocks.{layer}.attn.hook_z"].double().reshape(*tokens.shape, a.n_heads, a.d_head)
        pat = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        for h in range(a.n_heads):
            zu = torch.einsum("qk,bkd->bqd", w, v[:, :, h // (a.n_heads // a.n_kv_heads)])
            zh = z[:, :, h]
            # position 0 reaches one key (uniform by construction) and is left out
            dist = ((zh - zu).norm(dim=-1) / zh.norm(dim=-1).clamp_min(1e-12))[:, 1:].mean()  # tiny llama: BOS = pad row, v = 0
            cos = torch.nn.functional.cosine_similarity(zh, zu, dim=-1, eps=1e-12)[:, 1:].mean()
            self_attn = pat[:, h].diagonal(dim1=-2, dim2=-1)[:, 1:].mean()
            # the same cached z and v, reduced in float32: means and norms over d_head and positions
            tol = float(dot_tol(1.0, a.d_head * n))
            assert abs(res.distance[layer, h] - dist) <= tol * max(1.0, float(dist))
            assert abs(res.cosine[layer, h] - cos) <= tol
            assert abs(res.self_attention[layer, h] - self_attn) <= tol
    assert torch.allclose(res.self_uniform.double(), (1.0 / torch.arange(2, n + 1).double()).mean().expand(a.n_layers))
    assert res.n_queries.tolist() == [len(SAME_LEN) * (n - 1)] * a.n_layers
    assert res.n_single_key.tolist() == [len(SAME_LEN)] * a.n_layers
    df = res.to_dataframe()
    assert set(df.metric) == {"distance", "cosine", "self_attention", "self_bias"} and len(df) == 4 * a.n_layers * a.n_heads
    res.plot()


def test_padding_is_excluded(tiny_arch):
    """Left and right padding give the same statistics: pad queries and keys never count."""
    left = association_bias(tiny_arch, TEXTS, padding_side="left")
    right = association_bias(tiny_arch, TEXTS, padding_side="right")
    assert torch.equal(left.n_queries, right.n_queries) and torch.equal(left.n_single_key, right.n_single_key)
    # two padded batches: z and v within resid_rel of each other, relative (tests/tolerance.py)
    a = ew.adapt(tiny_arch)
    tol = resid_rel(a) * a.d_head**0.5 + float(dot_tol(1.0, a.d_head))
    for name in ("distance", "cosine", "self_attention"):
        assert torch.allclose(getattr(left, name), getattr(right, name), atol=tol, rtol=tol)
    assert torch.equal(left.self_uniform, right.self_uniform)  # counts of keys: exact


def _tols(model, inputs, targets, **kw):
    """:func:`tolerance.forward_tols` of the swap of ``targets`` on ``inputs``."""
    a = ew.adapt(model)
    tokens, mask = ew.tokenize(a, inputs, **kw) if not isinstance(inputs, torch.Tensor) else (inputs, kw["mask"])
    lo, _ = _logits_and_final(model, tokens, mask, [])
    ls, fs = _logits_and_final(model, tokens, mask, [UniformSwap(targets, method="pattern")])
    return forward_tols(a, fs[mask], ls.log_softmax(-1)[mask], other=lo.log_softmax(-1)[mask])


def _logits_and_final(model, tokens, mask, writers):
    logits, finals = [], []

    class Final(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.final_resid_hook]

        def read(self, name, value, ctx):
            finals.append(value.clone())

    ew.run(model, tokens, attention_mask=mask, readers=[Final()], writers=writers,
           on_logits=lambda lg, ctx: logits.append(lg))
    return torch.cat(logits).double(), torch.cat(finals).double()


@pytest.mark.parametrize("targets", ["all", [1], [(0, 2)]])
def test_downstream_matches_manual(tiny_arch, targets):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    lo, fo = _logits_and_final(tiny_arch, tokens, mask, [])
    with torch.no_grad():  # the model's own logits, no embedwalk in the way
        own = tiny_arch(tokens, attention_mask=mask.long()).double()
    ls, fs = _logits_and_final(tiny_arch, tokens, mask, [UniformSwap(targets, method="pattern")])
    po, ps = lo.log_softmax(-1), ls.log_softmax(-1)
    t = forward_tols(a, fs[mask], ps[mask], other=po[mask])  # the swapped forward's magnitudes
    assert torch.allclose(own[mask].log_softmax(-1), po[mask], atol=logprob_tol(a, fo[mask], po[mask]), rtol=0)
    pair = mask[:, :-1] & mask[:, 1:]
    tgt = tokens[:, 1:, None]
    nll_o = -po[:, :-1].gather(-1, tgt)[..., 0][pair].mean()
    nll_s = -ps[:, :-1].gather(-1, tgt)[..., 0][pair].mean()
    kl = (po.exp() * (po - ps)).sum(-1)[mask].mean()
    top1 = (po.argmax(-1) == ps.argmax(-1))[mask].double().mean()
    cos = torch.nn.functional.cosine_similarity(fo, fs, dim=-1)[mask].mean()
    eff = downstream(tiny_arch, tokens, targets, attention_mask=mask)  # fast path, float32
    # the fast path (float32) against the pattern method's forward: two computations of it
    assert abs(eff.loss_original - nll_o) <= t["loss"] and abs(eff.loss_swapped - nll_s) <= t["loss"]
    assert abs(eff.delta_loss - (nll_s - nll_o)) <= t["delta_loss"]
    assert abs(eff.kl - kl) <= t["kl"] and kl > 0
    assert abs(eff.top1_agreement - top1) < 1e-9
    assert abs(eff.composite_cosine - cos) <= t["cosine"]
    assert eff.n_positions == int(mask.sum()) and eff.n_predicted == int(pair.sum())


def test_sweep_rows_equal_single_swaps(tiny_arch):
    res = sweep(tiny_arch, TEXTS)
    a = ew.adapt(tiny_arch)
    t = res.table
    assert list(t.unit).count("layer") == a.n_layers and list(t.unit).count("head") == a.n_layers * a.n_heads
    tol = _tols(tiny_arch, TEXTS, [1])
    one = downstream(tiny_arch, TEXTS, [1], method="pattern")
    row = t[(t.unit == "layer") & (t.layer == 1)].iloc[0]
    assert abs(row.delta_loss - one.delta_loss) <= tol["delta_loss"] and abs(row.kl - one.kl) <= tol["kl"]
    head = downstream(tiny_arch, TEXTS, [(0, 3)])
    assert abs(res.head_matrix("kl")[0, 3] - head.kl) <= _tols(tiny_arch, TEXTS, [(0, 3)])["kl"]
    everything = downstream(tiny_arch, TEXTS, "all")
    assert abs(t[t.unit == "all"].iloc[0].kl - everything.kl) <= _tols(tiny_arch, TEXTS, "all")["kl"]
    assert set(res.to_dataframe().metric) >= {"delta_loss", "kl", "top1_agreement", "composite_cosine"}
    res.plot()
    with pytest.raises(EmbedwalkError, match="units"):
        sweep(tiny_arch, TEXTS, units=["neuron"])
    with pytest.raises(EmbedwalkError, match="out of range"):
        downstream(tiny_arch, TEXTS, [9])


def test_smollm2_measurements(smollm2):
    text = ["The quick brown fox jumps over the lazy dog because it was bored.", "Paris is the capital of"]
    res = association_bias(smollm2, text)
    a = ew.adapt(smollm2)
    assert res.distance.shape == (a.n_layers, a.n_heads)
    assert (res.cosine <= 1 + 3 * dot_tol(1.0, a.d_head)).all() and (res.distance >= 0).all()
    assert (res.self_attention >= 0).all() and (res.self_attention <= 1).all()
    # a layer row of the sweep (fast path) equals an independent pattern-method swap of that layer
    sw = sweep(smollm2, text, units=["layer"], layers=[0, 29])
    one = downstream(smollm2, text, [29], method="pattern")
    row = sw.table[sw.table.layer == 29].iloc[0]
    tol = _tols(smollm2, text, [29])
    assert abs(row.kl - one.kl) <= tol["kl"] and abs(row.delta_loss - one.delta_loss) <= tol["delta_loss"]
    assert (sw.table.kl > 0).all() and (sw.table.top1_agreement <= 1).all()


def test_value_offset_is_the_value_bias_through_the_norm():
    """c (what association_bias removes from z) = ln_1 bias through W_V plus b_V, from the HF
    weights of a GPT-2 with random norm and linear biases; zero once TL has folded them."""
    from embedwalk.association.probes import value_offset
    from embedwalk.testing import matrix_case, matrix_modes, tiny_model

    mode = matrix_modes("gpt2")[0]
    model, hf = matrix_case("gpt2", mode)
    a = ew.adapt(model)
    got = value_offset(a)
    d = a.d_model
    for layer, block in enumerate(hf.transformer.h):
        w, b = block.attn.c_attn.weight.double(), block.attn.c_attn.bias.double()  # Conv1D: [d, 3d]
        want = block.ln_1.bias.double() @ w[:, 2 * d:] + b[2 * d:]
        # b_ln @ W_V over d terms, float32 against float64
        scale = block.ln_1.bias.double().abs() @ w[:, 2 * d:].abs() + b[2 * d:].abs()
        assert ((got[layer].double().reshape(-1) - want).abs() <= dot_tol(scale, d)).all()
        assert want.abs().max() > 0.1
    if mode == "bridge":
        processed = matrix_case("gpt2", "compat")[0]
    else:
        processed = tiny_model("gpt2", "hooked", stress=True, processed=True)
    # folded away: a zero block input meets no norm bias and no value bias, so nothing is left
    assert value_offset(ew.adapt(processed)).abs().max() == 0


def _one_forward_per_unit(model, tokens, mask, targets):
    """The swap as one plain forward per unit (pattern method), metrics in float64."""
    lo, fo = _logits_and_final(model, tokens, mask, [])
    ls, fs = _logits_and_final(model, tokens, mask, [UniformSwap(targets, method="pattern")])
    po, ps = lo.log_softmax(-1), ls.log_softmax(-1)
    pair = mask[:, :-1] & mask[:, 1:]
    tgt = tokens[:, 1:, None]
    return {
        "loss_original": -po[:, :-1].gather(-1, tgt)[..., 0][pair].mean(),
        "loss_swapped": -ps[:, :-1].gather(-1, tgt)[..., 0][pair].mean(),
        "kl": (po.exp() * (po - ps)).sum(-1)[mask].mean(),
        "top1_agreement": (po.argmax(-1) == ps.argmax(-1))[mask].double().mean(),
        "composite_cosine": torch.nn.functional.cosine_similarity(fo, fs, dim=-1)[mask].mean(),
    }


def test_sweep_reuses_work_and_equals_one_forward_per_unit(tiny_arch, capsys):
    """Resumed passes, head swaps packed as row groups (split over several forwards) and
    several prompt batches give every row of the one-forward-per-unit computation."""
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    res = sweep(tiny_arch, tokens, attention_mask=mask, batch_size=3, rows_per_forward=7, progress=False)
    assert capsys.readouterr().err == ""
    t = res.table
    for _, row in t.iterrows():
        targets = "all" if row.unit == "all" else [int(row.layer)] if row.unit == "layer" else [(int(row.layer), int(row["head"]))]
        want = _one_forward_per_unit(tiny_arch, tokens, mask, targets)
        tol = _tols(tiny_arch, tokens, targets, mask=mask)
        tol["top1_agreement"] = 1e-9  # a mean of booleans: exact unless a tie within rounding
        tol["loss_original"] = tol["loss_swapped"] = tol["loss"]
        tol["composite_cosine"] = tol["cosine"]
        for k, v in want.items():
            assert abs(row[k] - float(v)) <= tol[k], (row.unit, row.layer, row["head"], k, row[k], float(v), tol[k])
    assert (t.kl > 0).all() and len(t) == 1 + a.n_layers * (1 + a.n_heads)
    sweep(tiny_arch, TEXTS[:2], units=["layer"], layers=[1], progress=True)
    assert "swap sweep" in capsys.readouterr().err


def test_resume_skips_earlier_blocks(tiny_arch):
    """Blocks before the resumed layer do not compute their MLP (the bypass fires no hook there)."""
    from embedwalk.association.prefix import Resume

    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, SAME_LEN)
    seen = []

    class Seen(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook("resid_pre", 1), adapter.hook("mlp_out", 1)]

        def read(self, name, value, ctx):
            seen.append(name)

    resid = torch.randn(*tokens.shape, a.d_model)
    logits = []
    ew.run(tiny_arch, tokens, readers=[Seen()], writers=[Resume(1, resid)], on_logits=lambda lg, ctx: logits.append(lg))
    with torch.no_grad():
        want = tiny_arch(resid, start_at_layer=1) if a.generation == "hooked" else None
    if want is not None:  # the same float32 blocks on the same input: the same arithmetic
        assert torch.allclose(logits[0], want, atol=logit_tol(a, resid), rtol=0)
    assert seen == [a.hook("resid_pre", 1), a.hook("mlp_out", 1)]
    assert Resume(1, resid).bypasses(a, watched=frozenset(), taken=frozenset(), ctx=None)


@pytest.mark.parametrize("family", ["mistral", "gpt_neo"])
def test_sweep_averages_over_the_keys_each_layer_reaches(family):
    """On sliding-window layers a sweep's layer and head rows equal `downstream` with the same
    targets (UniformSwap's default: the keys the layer's own attention reaches), on text longer
    than the window, so averaging over the whole prefix would differ."""
    from embedwalk.testing import matrix_case, matrix_modes

    model, _ = matrix_case(family, matrix_modes(family)[0])
    a = ew.adapt(model)
    windowed = [l for l in range(a.n_layers) if a.attention_window(l) is not None]
    assert windowed and all(a.attention_window(l) < 10 for l in windowed)
    text = " ".join(f"w{5 + (7 * i) % 150}" for i in range(14))
    res = sweep(model, text, units=["layer", "head"], layers=windowed, progress=False).table
    for _, row in res.iterrows():
        targets = [int(row.layer)] if row.unit == "layer" else [(int(row.layer), int(row["head"]))]
        want = downstream(model, text, targets, method="pattern")
        tol = _tols(model, text, targets)
        assert abs(row.kl - want.kl) <= tol["kl"] and abs(row.loss_swapped - want.loss_swapped) <= tol["loss"]
