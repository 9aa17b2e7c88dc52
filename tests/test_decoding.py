"""The decoding walk against the model's own logits, step by step and in one pass."""

import pytest
import torch

import embedwalk as ew
from tolerance import logprob_tol, resid_rel, resid_tol
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses.decoding import decoding_walk

PROMPT = "w5 w6 w7"


def _one_pass_logprobs(model, walk):
    """Log-probs of the generated sequence in one pass, the chosen tokens' entries, and the
    tolerance of a step-by-step computation of them (tests/tolerance.py: the steps' shorter
    forwards round differently)."""
    a = ew.adapt(model)
    with torch.no_grad():
        logits, cache = model.run_with_cache(walk.tokens[None].to(a.device), names_filter=[a.final_resid_hook])
    logp = logits[0].double().log_softmax(-1).cpu()
    n = len(walk.prompt_tokens)
    resid = cache[a.final_resid_hook][0, n - 1 : -1]
    tol = logprob_tol(a, resid, logp, resid_rel=resid_rel(a))
    lp = logp[n - 1 : -1]
    return lp, lp.gather(-1, walk.chosen[:, None])[:, 0], tol


def test_greedy_is_argmax_and_path_logprob(tiny_arch):
    walk = decoding_walk(tiny_arch, PROMPT, max_new_tokens=5, stop_at_eos=False)
    assert len(walk.chosen) == 5
    logp, chosen_lp, tol = _one_pass_logprobs(tiny_arch, walk)
    # one pass over the generated sequence: every step was the argmax of the model's logits
    assert torch.equal(walk.chosen, logp.argmax(-1))
    assert torch.allclose(walk.logprob.double(), chosen_lp, atol=tol, rtol=0)
    assert abs(float(walk.path_logprob[-1]) - float(chosen_lp.sum())) <= len(chosen_lp) * tol
    # the lens summary's last readout is the model's own distribution (kl_tol of a row with itself)
    assert float(walk.lens_kl[:, -1].abs().max()) <= 2 * tol
    assert torch.equal(walk.lens_top1[:, -1], walk.chosen)
    assert (walk.lens_kl >= 0).all()
    # the context vector is the final residual at the last position
    a = ew.adapt(tiny_arch)
    with torch.no_grad():
        _, cache = tiny_arch.run_with_cache(walk.tokens[None][:, :-1])
    want = cache[a.final_resid_hook][0, -1]
    assert torch.allclose(walk.context[-1], want, atol=resid_tol(a, want), rtol=0)


def test_sampling_seed_and_top_k(tiny_arch):
    kw = dict(max_new_tokens=4, temperature=1.5, top_k=3, stop_at_eos=False)
    w1 = decoding_walk(tiny_arch, PROMPT, seed=7, **kw)
    w2 = decoding_walk(tiny_arch, PROMPT, seed=7, **kw)
    assert torch.equal(w1.chosen, w2.chosen)
    logp, chosen_lp, tol = _one_pass_logprobs(tiny_arch, w1)
    top3 = logp.topk(3, dim=-1).indices
    assert (top3 == w1.chosen[:, None]).any(-1).all()
    assert torch.allclose(w1.logprob.double(), chosen_lp, atol=tol, rtol=0)
    others = [decoding_walk(tiny_arch, PROMPT, seed=s, **kw).chosen for s in (8, 9)]
    assert any(not torch.equal(o, w1.chosen) for o in others)  # the seed matters
    # a vanishing nucleus keeps only the top token: sampling becomes greedy
    nucleus = decoding_walk(tiny_arch, PROMPT, max_new_tokens=3, temperature=1.0, top_p=1e-6, seed=0, stop_at_eos=False)
    greedy = decoding_walk(tiny_arch, PROMPT, max_new_tokens=3, stop_at_eos=False)
    assert torch.equal(nucleus.chosen, greedy.chosen)


def test_tables_figure_and_errors(tiny_arch):
    walk = decoding_walk(tiny_arch, PROMPT, max_new_tokens=3, stop_at_eos=False)
    a = ew.adapt(tiny_arch)
    df = walk.to_dataframe()
    assert len(df) == 3 * (a.n_layers + 1)
    assert {"step", "token", "prob", "path_logprob", "layer", "lens_top1", "kl_to_final"} <= set(df.columns)
    assert list(walk.steps().token) == [walk.token_strs[int(t)] for t in walk.chosen]
    with pytest.raises(EmbedwalkError, match="temperature"):
        decoding_walk(tiny_arch, PROMPT, temperature=-1)
    with pytest.raises(EmbedwalkError, match="top_k"):
        decoding_walk(tiny_arch, PROMPT, top_k=0)
    with pytest.raises(EmbedwalkError, match="top_p"):
        decoding_walk(tiny_arch, PROMPT, top_p=1.5)
    with pytest.raises(EmbedwalkError, match="one prompt"):
        decoding_walk(tiny_arch, [PROMPT, PROMPT])
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = walk.plot()
    token_labels = [t.get_text() for t in fig.axes[0].texts if ": " in t.get_text()]
    assert 1 <= len(token_labels) <= 3 and token_labels[0].startswith("0: ")  # overlapping labels are dropped
    plt.close(fig)


def test_smollm2_greedy_paris(smollm2):
    walk = decoding_walk(smollm2, "The capital of France is", max_new_tokens=2)
    assert walk.token_strs[int(walk.chosen[0])] == " Paris"
    assert 0 < float(walk.prob[0]) <= 1
