"""Model-level concept experiments, checked against the model's own logits and independent forwards."""

import numpy as np
import pandas as pd
import pytest
import torch

import embedwalk as ew
from embedwalk.concepts.experiments import (
    ConceptTable,
    EmbedWriter,
    continuation_logprobs,
    layer_probes,
    multiple_choice,
    random_copy,
    token_regression,
)
from embedwalk.concepts.features import context_vectors, segment_vectors
from embedwalk.concepts.probes import cross_validate_probe
from embedwalk.concepts.stats import tensor_batches
from embedwalk.errors import EmbedwalkError
from embedwalk.run import Reader, run

ITEMS = [
    {"id": "t0", "context": ["w5 w6 w7", "w8 w9"], "question": "w10 w11", "options": ["w12", "w13 w14", "w15"], "answer": 1},
    {"id": "t1", "context": ["w20 w21", "w22"], "question": "w23", "options": ["w24", "w25", "w26 w27"], "answer": 2},
]


def _logprob_sum(model, ids, n_prefix):
    """Independent: one unpadded forward, log_softmax in float64 of the model's own logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    lp = logits.log_softmax(-1)
    return sum(lp[t - 1, ids[t]].item() for t in range(n_prefix, len(ids)))


def test_continuation_logprobs_equal_manual_sum(tiny):
    a = ew.adapt(tiny)
    prefixes = [a.to_tokens("w5 w6 w7").tolist(), a.to_tokens("w9").tolist()]
    conts = [[11, 12], [13, 14, 15]]
    got = continuation_logprobs(tiny, prefixes, conts, batch_size=2)
    for i in range(2):
        want = _logprob_sum(tiny, prefixes[i] + conts[i], len(prefixes[i]))
        assert abs(got[i].item() - want) < 1e-4


class _Capture(Reader):
    def __init__(self):
        self.rows = {}

    def hook_points(self, adapter):
        return ["hook_embed", adapter.hook("resid_pre", 0)]

    def read(self, name, value, ctx):
        self.rows.setdefault(name, []).append(value.clone())

    def result(self):
        return {k: torch.cat(v) for k, v in self.rows.items()}


def _independent_logits(model, tokens, embeds):
    """Forward from explicit input embeddings without embedwalk's hooks."""
    a = ew.adapt(model)
    with torch.no_grad():
        if a.generation == "bridge":
            return model.original_model(inputs_embeds=embeds).logits
        resid = embeds + (a.W_pos[: tokens.shape[1]][None] if a.has_pos_embed else 0)
        return model(resid, start_at_layer=0, tokens=tokens)


def test_embed_writer_changes_embeddings_like_inputs_embeds(tiny_arch):
    a = ew.adapt(tiny_arch)
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 1, 1, 40, 41, 42]])
    vecs = torch.randn(2, a.d_model)
    writer = EmbedWriter([(torch.tensor([1, 2]), vecs)])
    (cap,) = run(tiny_arch, tokens, readers=[_Capture()], writers=[writer])
    assert torch.allclose(cap["hook_embed"][0, 1:3], vecs, atol=1e-6)
    assert torch.allclose(cap["hook_embed"][0, 3:], a.W_E[tokens[0, 3:]], atol=1e-6)
    if a.has_pos_embed:  # the position vector is still added, as with inputs_embeds
        assert torch.allclose(cap[a.hook("resid_pre", 0)][0, 1:3], vecs + a.W_pos[1:3], atol=1e-5)
    embeds = a.W_E[tokens].clone()
    embeds[0, 1:3] = vecs
    ref = _independent_logits(tiny_arch, tokens, embeds).log_softmax(-1)
    got = continuation_logprobs(tiny_arch, [tokens[0, :4].tolist()], [tokens[0, 4:].tolist()],
                                inserts=[(torch.tensor([1, 2]), vecs)])
    want = ref[0, 3, 41] + ref[0, 4, 42]
    assert abs(got.item() - want.item()) < 1e-4
    plain = continuation_logprobs(tiny_arch, [tokens[0, :4].tolist()], [tokens[0, 4:].tolist()])
    assert abs(plain.item() - got.item()) > 1e-3  # the vectors really changed the prediction


def test_multiple_choice_against_independent_computations(tiny_arch):
    a = ew.adapt(tiny_arch)
    res = multiple_choice(tiny_arch, ITEMS, readout=1, reduction="weighted", gen_readout=0, batch_size=4)
    # full-context scores are the model's own log-prob sums
    for i, it in enumerate(ITEMS):
        prefix = a.to_tokens(" ".join(it["context"]) + "\nQuestion: " + it["question"] + "\nAnswer:").tolist()
        for o, opt in enumerate(it["options"]):
            ids = prefix + a.to_tokens(" " + opt, prepend_bos=False).tolist()
            assert abs(res.scores["full_context"][i, o].item() - _logprob_sum(tiny_arch, ids, len(prefix))) < 1e-4
    # the similarity test from separately computed segment vectors
    for how in ("mean", "weighted", "last"):
        for i, it in enumerate(ITEMS):
            v = segment_vectors(tiny_arch, it["context"] + [it["question"]] + it["options"], how).vectors
            ctx = v[: len(it["context"]) + 1].mean(0)
            opts = v[len(it["context"]) + 1:]
            pred = torch.einsum("pd,opd->op", ctx, opts).argmax(0)
            assert torch.equal(res.similarity[how]["dot"][i], pred == it["answer"])
    # concept generation = a forward with the weighted segment vectors as input embeddings
    it = ITEMS[0]
    seg = segment_vectors(tiny_arch, it["context"], "weighted").vectors[:, 0]
    q = a.to_tokens("\nQuestion: " + it["question"] + "\nAnswer:", prepend_bos=False).tolist()
    opt = a.to_tokens(" " + it["options"][1], prepend_bos=False).tolist()
    ids = torch.tensor([[1, a.pad_token_id, a.pad_token_id] + q + opt])
    embeds = a.W_E[ids].clone()
    embeds[0, 1:3] = seg
    lp = _independent_logits(tiny_arch, ids, embeds).double().log_softmax(-1)[0]
    n = 3 + len(q)
    want = sum(lp[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))
    assert abs(res.scores["concept_generation"][0, 1].item() - want) < 1e-4
    df = res.to_dataframe()
    assert {"similarity", "full_context", "concept_generation", "question_only", "chance"} <= set(df.method)
    assert res.plot() is not None
    with pytest.raises(EmbedwalkError):
        multiple_choice(tiny_arch, [{"context": "w5", "question": "w6", "options": ["w7"], "answer": 0}])


def test_multiple_choice_counts_readouts_under_readout_and_refuses_layer(tiny_arch, capsys):
    """``readout=`` is a readout index or label (0 = embedding, l + 1 = block l's output), as in
    logit_lens(readouts=); the old ``layer=`` / ``gen_layer=`` (which counted readouts while
    ``layers=`` elsewhere counts blocks) are refused naming the new spelling."""
    from embedwalk.cli import main

    by_label = multiple_choice(tiny_arch, ITEMS, readout="0", gen_readout="embed", methods=("concept_generation",),
                               batch_size=4, progress=False)
    by_index = multiple_choice(tiny_arch, ITEMS, readout=1, gen_readout=-3, methods=("concept_generation",),
                               batch_size=4, progress=False)
    assert (by_label.readout, by_label.gen_readout) == (by_index.readout, by_index.gen_readout) == (1, 0)
    # the summary names block 0's output, the readout after the embedding
    assert "similarity[mean,dot]@0" in set(by_label.summary().method)
    assert torch.equal(by_label.scores["concept_generation"], by_index.scores["concept_generation"])
    for kw, new in (({"layer": 1}, "readout"), ({"gen_layer": 0}, "gen_readout"), ({"layer": -1}, "readout")):
        with pytest.raises(EmbedwalkError, match=f"`{list(kw)[0]}=` was renamed `{new}=`"):
            multiple_choice(tiny_arch, ITEMS, progress=False, **kw)
    with pytest.raises(EmbedwalkError, match="one readout index or label"):
        multiple_choice(tiny_arch, ITEMS, readout=[1], progress=False)
    for flag, new in (("--layer", "--readout"), ("--gen-layer", "--gen-readout")):
        assert main(["concepts", "mc", flag, "1"]) != 0
        assert f"`{flag}=` was renamed `{new}=`" in capsys.readouterr().err


def _planted_table(n=24):
    words = [f"w{10 + i}" for i in range(2 * n)]
    label = np.r_[np.zeros(n, int), np.ones(n, int)]
    return ConceptTable("planted", words, pd.DataFrame({"f": label.astype(float)}), label,
                        ["a", "b"], np.r_[np.arange(n), np.arange(n)])


def test_layer_probes_match_direct_cross_validation(tiny):
    table = _planted_table()
    res = layer_probes(tiny, [table], templates=("w3 {}", "w4 w5 {}"), n_perm=5, n_control=2,
                       random_baseline=False, points=[0, -1])
    df = res.to_dataframe()
    assert list(df.point) == ["embed", str(ew.adapt(tiny).n_layers - 1)]
    texts = [t.format(w) for w in table.words for t in ("w3 {}", "w4 w5 {}")]
    vecs = context_vectors(tiny, texts).vectors
    y, g = np.repeat(table.label, 2), np.repeat(table.group, 2)
    for row in df.itertuples():
        cv = cross_validate_probe(tensor_batches(vecs[:, row.index], torch.tensor(y), g), 2, "mass_mean")
        assert abs(cv.accuracy - row.real) < 1e-12
    assert ((df.real_p > 0) & (df.real_p <= 1)).all()
    assert np.allclose(df.selectivity, df.real - df.control)
    # 5 permutations resolve p only down to 1/6: alpha=0.05 is unreachable and must say so
    with pytest.raises(EmbedwalkError, match="n_perm >= 20"):
        res.first_readable()
    first = res.first_readable(margin=-1.0, alpha=0.5).iloc[0]
    ok = df[(df.selectivity >= -1.0) & (df.real_p < 0.5)]
    assert first.first_point == (ok.sort_values("index").point.iloc[0] if len(ok) else None)
    assert first.best_accuracy == df.real.max()


def test_random_copy_is_fresh_and_deterministic(tiny_arch):
    a = ew.adapt(tiny_arch)
    before = a.W_E.detach().clone()
    r1, r2 = random_copy(tiny_arch, seed=3), random_copy(tiny_arch, seed=3)
    assert torch.equal(a.W_E, before)
    assert not torch.allclose(ew.adapt(r1).W_E, before)
    assert torch.equal(ew.adapt(r1).W_E, ew.adapt(r2).W_E)
    assert ew.adapt(r1).W_E.std().item() == pytest.approx(0.02, rel=0.1)
    v = context_vectors(r1, ["w5 w6"]).vectors
    assert torch.isfinite(v).all()


def test_token_regression_controls_on_smollm2(smollm2):
    res = token_regression(smollm2, ["number", "gender"], kinds=["embed"], n_perm=20)
    df = res.to_dataframe()
    allrows = df[df.target == "all"].set_index(["concept", "direction"])
    # shuffled controls explain nothing out of fold
    assert (allrows.null_mean < 0.02).all()
    # singular/plural is linearly readable from the token embeddings, far above the null
    r = allrows.loc[("number", "vectors_to_features")]
    assert r.cv_r2 > 0.3 and r.cv_r2 > r.null_q95 and r.p_value <= 1 / 21 + 1e-12
    assert res.plot() is not None


def test_token_regression_null_on_random_features(tiny):
    table = _planted_table()
    table.features = pd.DataFrame({"f": np.random.default_rng(0).normal(size=len(table))})
    res = token_regression(tiny, [table], kinds=["embed"], n_perm=5)
    df = res.to_dataframe()
    # random features carry no signal: the real fit is no better than the shuffled null
    assert (df.cv_r2 < 0.2).all() and (df.null_mean < 0.05).all()


def test_token_regression_refuses_words_the_tokenizer_does_not_know(tiny):
    # the word-level test model knows only w0, w1, ...: English words become <unk>, whose single
    # vector would be regressed in place of every word
    with pytest.raises(EmbedwalkError, match="does not know"):
        token_regression(tiny, ["number"], n_perm=3)


def test_fit_from_store_equals_in_memory_fit_and_cli(tiny_arch, tmp_path, capsys):
    from embedwalk.cli import main
    from embedwalk.concepts.experiments import fit_from_store
    from embedwalk.concepts.ridge import fit_ridge
    from embedwalk.concepts.stats import FoldedStats
    from embedwalk.store import cache_activations

    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(2, 199, size=6)) for _ in range(24)]
    meta = [{"label": float(i % 3), "topic": f"t{i % 5}"} for i in range(24)]
    store = cache_activations(tiny_arch, texts, tmp_path / "s", layers=[0, 1], positions="all",
                              dtype="float32", metadata=meta, progress=False)
    fit, info = fit_from_store(store, "resid_post.1", "resid_post.0", batch_size=50)
    assert info["rows"] == len(store)
    everything = store.get(slice(None))
    fs = FoldedStats(5).update(everything["blocks.1.hook_resid_post"], everything["blocks.0.hook_resid_post"],
                               groups=everything.prompt.numpy())
    ref = fit_ridge(fs)
    assert torch.allclose(fit.coef, ref.coef, rtol=1e-6, atol=1e-9)
    assert torch.allclose(fit.cv_r2, ref.cv_r2, atol=1e-9)
    # the fit records the store's model and residual basis, and refuses another model's
    assert fit.fitted_in == store.manifest["config"]["model"] and ref.fitted_in is None
    fit.check_compatible(tiny_arch)
    fp = fit.fitted_in["fingerprint"]
    tampered = {**fp, "digest": "0" * 64, "tensors": {**fp["tensors"], fp["unembed"]: "0" * 16}}
    with pytest.raises(EmbedwalkError, match=r"the models differ \(the weights differ, the unembedding among them: 1 of"):
        fit.check_compatible({**fit.fitted_in, "fingerprint": tampered})
    rev, _ = fit_from_store(store, "resid_post.1", "meta:label,topic", reverse=True, group="topic")
    assert rev.coef.shape == (1 + 5, ew.adapt(tiny_arch).d_model)
    assert main(["concepts", "fit", "--store", str(tmp_path / "s"), "--x", "resid_post.1", "--y", "meta:label",
                 "--out", str(tmp_path / "fit.safetensors")]) == 0
    assert "held-out R²" in capsys.readouterr().out and (tmp_path / "fit.safetensors").exists()
