"""The tuned lens: identity at init, training lowers held-out KL, files round-trip, wrong models refused."""

import json

import pytest
import torch

import embedwalk as ew
from tolerance import dot_tol, kl_tol, logprob_tol, resid_rel
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses import TunedLens, logit_lens, train_tuned_lens
from embedwalk.lenses.tuned import sample_text

from conftest import GENERATION, make_tiny


def _texts(seed, n=24, length=12):
    g = torch.Generator().manual_seed(seed)
    # a little structure (runs of consecutive words) so there is something to learn
    starts = torch.randint(2, 150, (n,), generator=g)
    return [" ".join(f"w{int(s) + i}" for i in range(length)) for s in starts]


def test_untrained_lens_is_the_logit_lens(tiny):
    lens = TunedLens.for_model(tiny)
    assert lens.labels == [p.label for p in ew.adapt(tiny).readout_points()[:-1]]
    plain = logit_lens(tiny, _texts(0, n=3))
    tuned = logit_lens(tiny, _texts(0, n=3), translator=lens)
    # an untrained translator is h + 0 h + 0: the same float32 vectors, the same numbers
    assert torch.equal(plain.kl_to_final, tuned.kl_to_final)
    assert torch.equal(plain.top_ids, tuned.top_ids)


def test_training_lowers_heldout_kl_and_matches_a_manual_kl(tiny_arch):
    a = ew.adapt(tiny_arch)
    train, heldout = _texts(1), _texts(2, n=6)
    lens = train_tuned_lens(tiny_arch, train, epochs=4, lr=3e-3, step_tokens=32, progress=False)
    assert all(p.grad is None for p in tiny_arch.parameters())  # only the translators learn
    before = logit_lens(tiny_arch, heldout).layer_means()
    after = logit_lens(tiny_arch, heldout, translator=lens).layer_means()
    assert (after[:-1] < 0.95 * before[:-1]).all(), (before, after)
    assert len(lens.meta["history"]) > 4 and lens.meta["history"][-1] < lens.meta["history"][0]
    # the lens's KL is KL(final || readout(h + A h + b)), recomputed by hand in float64
    toks = a.to_tokens(heldout[0])[None]
    res = logit_lens(tiny_arch, heldout[0], translator=lens)
    with torch.no_grad():
        _, cache = tiny_arch.run_with_cache(toks)
        final = a.readout(cache[a.final_resid_hook][0]).double().log_softmax(-1)
        h = cache[a.hook("resid_post", 0)][0]
        i = lens.labels.index("0")
        moved = (h.double() + h.double() @ lens.weight[i].double().T + lens.bias[i].double()).float()
        lp = a.readout(moved).double().log_softmax(-1)
        # the lens translates in float32: moved within a d_model dot product's rounding of |h| + |A h|
        rel = float(dot_tol(1.0, a.d_model)) * float((h.abs() + (h @ lens.weight[i].T).abs()).max() / moved.abs().max())
        tol = logprob_tol(a, moved, lp, resid_rel=rel)
    kl = (final.exp() * (final - lp)).sum(-1)
    assert ((res.kl_to_final[1].double() - kl).abs() <= kl_tol(tol, final, lp)).all()


def test_save_load_and_refuse_another_model(tiny_arch, tmp_path):
    lens = train_tuned_lens(tiny_arch, _texts(3, n=8), epochs=1, lr=1e-2, progress=False)
    lens.save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "tuned_lens.safetensors"]
    back = TunedLens.load(tmp_path / "lens", tiny_arch)
    for w0, w1 in zip(lens.weight, back.weight):
        assert torch.equal(w0.detach().cpu(), w1.detach().cpu())
    texts = _texts(4, n=2)
    assert torch.equal(logit_lens(tiny_arch, texts, translator=lens).kl_to_final,
                       logit_lens(tiny_arch, texts, translator=back).kl_to_final)
    arch = "llama" if ew.adapt(tiny_arch).n_kv_heads != ew.adapt(tiny_arch).n_heads else "gpt2"
    other = make_tiny(arch, seed=7)
    with pytest.raises(EmbedwalkError, match="the model given differs: the weights differ, the unembedding among them"):
        logit_lens(other, texts, translator=back)
    with pytest.raises(EmbedwalkError, match="the model given differs: the weights differ, the unembedding among them"):
        TunedLens.load(tmp_path / "lens", other)
    wider = make_tiny(arch, d_model=32)
    with pytest.raises(EmbedwalkError, match="d_model"):
        logit_lens(wider, texts, translator=back)


@pytest.mark.skipif(GENERATION != "bridge", reason="compatibility mode is a TL 4 bridge feature")
def test_compatibility_mode_counts_as_another_model():
    raw = make_tiny("gpt2")
    lens = TunedLens.for_model(raw)
    compat = make_tiny("gpt2-compat")
    with pytest.raises(EmbedwalkError, match="compatibility mode"):
        lens.check_model(compat)


@pytest.mark.parametrize("prefix", ["", "layer_translators."])
def test_loads_the_tuned_lens_projects_checkpoint(tiny_arch, tmp_path, prefix):
    a = ew.adapt(tiny_arch)
    g = torch.Generator().manual_seed(0)
    state = _their_checkpoint(tmp_path, a, g, prefix=prefix, scale=0.01)
    lens = TunedLens.load(tmp_path, tiny_arch)
    # their translator i acts residually on hidden_states[i]: readout i (0 = embedding)
    h = torch.randn(3, a.d_model, generator=g)
    points = a.readout_points()
    for i in range(a.n_layers):
        W = state[f"{prefix}{i}.weight"]
        want = h.double() + h.double() @ W.double().T + state[f"{prefix}{i}.bias"].double()
        tol = dot_tol((h.abs() @ W.abs().T).double() + h.abs().double(), a.d_model)  # per entry
        assert ((lens(h, points[i]).double() - want).abs() <= tol).all()
    assert torch.equal(lens(h, points[-1]), h)  # the final readout is never translated
    (tmp_path / "config.json").write_text(json.dumps({"d_model": a.d_model + 1, "num_hidden_layers": a.n_layers}))
    with pytest.raises(EmbedwalkError, match="d_model"):
        TunedLens.load(tmp_path, tiny_arch)


def test_bad_training_arguments(tiny_arch):
    with pytest.raises(EmbedwalkError, match="optimizer"):
        train_tuned_lens(tiny_arch, _texts(0, n=2), optimizer="lbfgs")
    with pytest.raises(EmbedwalkError, match="epochs"):
        train_tuned_lens(tiny_arch, _texts(0, n=2), epochs=0)
    with pytest.raises(EmbedwalkError, match="out of range"):
        train_tuned_lens(tiny_arch, _texts(0, n=2), readouts=[42])


def test_sample_text_is_real_prose():
    train, heldout = sample_text("train"), sample_text("heldout")
    assert len(train) > 4 * len(heldout) > 0 and not set(train) & set(heldout)
    words = " ".join(train + heldout).split()
    assert len(words) > 2500
    common = sum(w.lower().strip(".,") in {"the", "and", "of", "a", "to", "in"} for w in words)
    assert common / len(words) > 0.12  # English function-word rate; word salad has ~none


def _processed(kind):
    """The same tiny model with TransformerLens weight processing (centred residual, folded norms)."""
    model = make_tiny(kind)
    if GENERATION == "bridge":
        model.enable_compatibility_mode()
    else:
        model.process_weights_()
    return model


def _their_checkpoint(path, a, g, *, prefix="", scale=0.05):
    """A random checkpoint in the tuned-lens project's format (params.pt + config.json)."""
    state = {}
    for i in range(a.n_layers):
        state[f"{prefix}{i}.weight"] = scale * torch.randn(a.d_model, a.d_model, generator=g)
        state[f"{prefix}{i}.bias"] = scale * torch.randn(a.d_model, generator=g)
    torch.save(state, path / "params.pt")
    (path / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "tiny", "d_model": a.d_model, "num_hidden_layers": a.n_layers,
        "bias": True, "unembed_hash": None, "lens_type": "linear_tuned_lens",
    }))
    return state


def test_a_lens_fitted_on_the_raw_model_is_refused_in_a_processed_basis(tmp_path):
    """Raw-fitted checkpoints (the tuned-lens project's and embedwalk's) match on the raw model,
    where the lens reproduces a float64 recomputation from the HF model's own hidden states, and
    are refused on the same model with processed weights (no exact conversion exists: centring
    drops the residual's mean)."""
    from embedwalk.testing import tiny_hf

    raw = make_tiny("gpt2")
    a = ew.adapt(raw)
    state = _their_checkpoint(tmp_path, a, torch.Generator().manual_seed(3))
    lens = TunedLens.load(tmp_path, raw)
    assert lens.basis == {"processed": False, "folded_norms": False, "centred_residual": False, "centred_unembed": False}
    text = "w5 w9 w13 w17 w21"
    res = logit_lens(raw, text, translator=lens)
    hf = tiny_hf("gpt2").double()  # the same weights (seed 0), read by Hugging Face itself
    ids = res.token[None]  # the tokens the lens read, one prompt, every position
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        h1 = out.hidden_states[1][0]
        moved = h1 + h1 @ state["1.weight"].double().T + state["1.bias"].double()
        lp = hf.lm_head(hf.transformer.ln_f(moved)).log_softmax(-1)
    final = out.logits[0].log_softmax(-1)
    kl = (final.exp() * (final - lp)).sum(-1)
    # float32 (embedwalk on TL) against float64 (HF): one float32 forward's rounding of the
    # residual, then of the readout (tests/tolerance.py)
    tol = logprob_tol(a, moved.float(), lp, resid_rel=resid_rel(a))
    assert ((res.kl_to_final[1].double() - kl).abs() <= kl_tol(tol, final, lp)).all()

    processed = _processed("gpt2")
    with pytest.raises(EmbedwalkError, match=r"fitted on the Hugging Face model's own hidden states.*centred residual.*without enable_compatibility_mode"):
        TunedLens.load(tmp_path, processed)
    with pytest.raises(EmbedwalkError, match=r"another residual basis.*raw.*processed weights \(folded norms, centred residual"):
        logit_lens(processed, text, translator=lens)
    lens.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["basis"] == lens.basis
    with pytest.raises(EmbedwalkError, match=r"another residual basis"):
        TunedLens.load(tmp_path / "ours", processed)
    assert torch.equal(logit_lens(raw, text, translator=TunedLens.load(tmp_path / "ours", raw)).kl_to_final, res.kl_to_final)
