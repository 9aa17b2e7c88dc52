"""The walk lens against run_with_cache and the model's own logits."""

import pytest
import torch

import embedwalk as ew
from tolerance import dot_tol, logprob_tol, resid_tol, unit_roundoff
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses.walk import walk_lens

TEXTS = ["w5 w6 w7 w8 w9", "w11 w12"]


def _cached_states(model, text):
    a = ew.adapt(model)
    toks = a.to_tokens(text)[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    states = torch.stack([cache[p.hook][0] for p in a.readout_points(mid=True)], 1)  # [pos, point, d]
    return toks[0], logits[0], states, cache


def _rest_tol(res):
    """``rest = (post - pre) - attn - mlp`` of a block the model computed as ``pre + attn + mlp``:
    at most two float32 roundings there and three here, each within ``u`` of an operand, so
    ``|rest| <= 6 u (|pre| + |post| + |attn| + |mlp|)`` (norms per point)."""
    pre, post = res.states[:, 0:-1:2].norm(dim=-1), res.states[:, 2::2].norm(dim=-1)
    return 6 * unit_roundoff(torch.float32) * (pre + post + res.attn_norm + res.mlp_norm)


def test_walk_matches_cache_and_logits(tiny):
    a = ew.adapt(tiny)
    res = walk_lens(tiny, TEXTS, positions=None, nearest_k=3)
    n0 = len(a.to_tokens(TEXTS[0]))
    assert res.states.shape == (n0 + len(a.to_tokens(TEXTS[1])), 2 * a.n_layers + 1, a.d_model)
    for p, text in enumerate(TEXTS):
        toks, logits, states, cache = _cached_states(tiny, text)
        sel = res.prompt == p
        assert torch.equal(res.pos[sel], torch.arange(len(toks)))
        assert torch.equal(res.token[sel], toks)
        tol = resid_tol(a, states)  # the lens ran both prompts as one padded batch
        assert torch.allclose(res.states[sel], states, atol=tol, rtol=0)
        for l in range(a.n_layers):
            assert torch.allclose(res.attn_out[sel][:, l], cache[a.hook("attn_out", l)][0], atol=tol, rtol=0)
        # the final point's nearest token under the unembedding is the model's own prediction
        assert torch.equal(res.unembed_ids[sel][:, -1, 0], logits.argmax(-1))
        # the states equal the cache's (above); their readout, independently, in float64
        final = res.states[sel][:, -1]
        with torch.no_grad():
            lp = a.readout(final).double().log_softmax(-1)
        assert torch.allclose(res.unembed_probs[sel][:, -1].double(), lp.exp().topk(3).values, atol=logprob_tol(a, final, lp), rtol=0)
        # cosines, independently
        emb = a.W_E[toks].detach().double()
        mine = res.states[sel].double()
        want = torch.nn.functional.cosine_similarity(mine, emb[:, None], dim=-1)
        real = emb.norm(dim=-1) > 0  # a zero (padding-index) embedding has no direction
        # a float32 cosine: three length-d dot products, each within dot_tol of |x||e|
        assert torch.allclose(res.cos_embed[sel][real].double(), want[real], atol=3 * dot_tol(1.0, a.d_model), rtol=0)
    # standard blocks add nothing besides attention and MLP
    assert (res.rest_norm <= _rest_tol(res)).all()
    ctol = 3 * dot_tol(1.0, a.d_model)  # a float32 cosine (three dot products), relative
    assert torch.allclose(res.cos_final[:, -1][res.states[:, -1].norm(dim=-1) > 0], torch.tensor(1.0), atol=ctol)
    assert (res.path_length * (1 + ctol) >= res.displacement).all()
    ok = res.path_length > 0
    assert ((res.straightness[ok] >= 0) & (res.straightness[ok] <= 1 + ctol)).all()


def test_padding_side_and_positions(tiny_arch):
    a = ew.adapt(tiny_arch)
    lengths = [len(a.to_tokens(t)) for t in TEXTS]
    left_tok = torch.full((2, max(lengths)), 1)
    mask = torch.zeros_like(left_tok, dtype=torch.bool)
    for i, t in enumerate(TEXTS):
        left_tok[i, -lengths[i]:] = a.to_tokens(t)
        mask[i, -lengths[i]:] = True
    left = walk_lens(tiny_arch, left_tok, attention_mask=mask, positions=[-1, 1])
    right = walk_lens(tiny_arch, TEXTS, positions=[-1, 1], padding_side="right")
    assert torch.equal(left.pos, right.pos) and torch.equal(left.pos, torch.tensor([lengths[0] - 1, 1, lengths[1] - 1, 1]))
    tol = resid_tol(a, right.states)
    assert torch.allclose(left.states, right.states, atol=tol, rtol=0)
    last = walk_lens(tiny_arch, TEXTS)  # default: each prompt's last real token
    assert torch.allclose(last.states, right.states[[0, 2]], atol=tol, rtol=0)
    with pytest.raises(EmbedwalkError, match="out of range"):
        walk_lens(tiny_arch, TEXTS, positions=[7])
    with pytest.raises(EmbedwalkError, match="nearest_k"):
        walk_lens(tiny_arch, TEXTS, nearest_k=0)
    with pytest.raises(EmbedwalkError, match="positions"):
        walk_lens(tiny_arch, TEXTS, positions="first")


def test_tables_and_figure(tiny_arch):
    res = walk_lens(tiny_arch, TEXTS[0], positions=[-1, -2])
    df = res.to_dataframe()
    assert len(df) == 2 * res.states.shape[1]
    assert {"prompt", "pos", "point", "stage", "step_norm", "part_norm", "rest_norm", "cos_final",
            "cos_embed", "unembed_top1", "embed_top1"} <= set(df.columns)
    agg = df[df.stage == "aggregation"]
    # an aggregation step is exactly the attention output: resid_mid = resid_pre + attn_out in
    # float32, so the step is attn_out within two roundings of the operands (norms, per point)
    bound = 2 * unit_roundoff(torch.float32) * (res.states.norm(dim=-1).max() + agg.part_norm.max())
    assert (agg.step_norm - agg.part_norm).abs().max() <= float(bound)
    assert len(res.summary()) == 2
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = res.plot(0)
    assert len(fig.axes[0].texts) >= res.states.shape[1]
    plt.close(fig)


def test_smollm2_walk_ends_at_paris(smollm2):
    res = walk_lens(smollm2, "The capital of France is", nearest_k=5)
    assert res.token_strs[int(res.unembed_ids[0, -1, 0])] == " Paris"
    a = ew.adapt(smollm2)
    toks = a.to_tokens("The capital of France is")[None]
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(toks, names_filter=[a.final_resid_hook])
        own = logits[0, -1].double().log_softmax(-1)
    tol = logprob_tol(a, cache[a.final_resid_hook][0, -1], own)
    assert torch.allclose(res.unembed_probs[0, -1].double(), own.exp().topk(5).values, atol=tol, rtol=0)
    assert (res.rest_norm <= _rest_tol(res)).all()
    assert 0 < float(res.straightness[0]) < 1


def test_cli_subcommands(capsys, tmp_path):
    import argparse

    from embedwalk.lenses.cli_walk import add_lens_subparsers

    parser = argparse.ArgumentParser()
    lens = parser.add_subparsers().add_parser("lens")
    add_lens_subparsers(lens.add_subparsers())
    for argv, expect in (
        (["lens", "walk", "w5 w6 w7", "--model", "tiny-llama"], "straightness"),
        (["lens", "decompose", "w5 w6 w7", "--model", "tiny-llama", "--token", "w9", "--top", "4"], "sum of DLAs"),
        (["lens", "decode", "w5 w6", "--model", "tiny-llama", "--max-new-tokens", "2"], "path_logprob"),
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        assert expect in capsys.readouterr().out
