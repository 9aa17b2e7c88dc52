"""Activation store, writing: stored rows equal the model's own activations, indexed right."""

import json

import pytest
import torch

import embedwalk as ew
from tolerance import logprob_tol, resid_rel, resid_tol
from embedwalk.errors import EmbedwalkError
from embedwalk.store import cache_activations, open_store, plan_hooks

TEXTS = ["w5 w6 w7 w8 w9 w10", "w9 w10", "w3 w4 w5", "w20 w21 w22 w23", "w7", "w30 w31 w32 w33 w34"]


def _reference(model, text, names):
    """run_with_cache on the prompt alone (no padding): an independent path to the same values."""
    toks = ew.adapt(model).to_tokens(text)[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    return toks[0], logits[0], {n: cache[n][0] for n in names}


def test_stored_vectors_equal_run_with_cache(tiny, tmp_path):
    a = ew.adapt(tiny)
    store = cache_activations(tiny, TEXTS, tmp_path / "s", hooks=["resid_post.0", "final", "final_normed"],
                              dtype="float32", batch_size=4, shard_rows=7, progress=False)
    first, final = a.hook("resid_post", 0), a.final_resid_hook
    assert store.hooks == [first, final, "final_normed"]
    assert len(store) == sum(len(a.to_tokens(t)) for t in TEXTS)  # every non-pad token, no pad row
    everything = store.get(slice(None))
    for p, text in enumerate(TEXTS):
        toks, logits, ref = _reference(tiny, text, [first, final])
        rows = everything.prompt == p
        assert torch.equal(everything.position[rows].long(), torch.arange(len(toks)))
        assert torch.equal(everything.tokens[rows].long(), toks)
        for name in (first, final):  # one padded batch against one prompt alone
            assert torch.allclose(everything[name][rows], ref[name], atol=resid_tol(a, ref[name]), rtol=0)
        # the normed vector is what the model's own unembedding reads: it reproduces the logits
        normed = everything["final_normed"][rows]
        b = a.b_U if a.b_U is not None else 0
        own = (normed.double() @ a.W_U.double() + b).log_softmax(-1)
        lp = logits.double().log_softmax(-1)
        assert torch.allclose(own, lp, atol=logprob_tol(a, ref[final], lp, resid_rel=resid_rel(a)), rtol=0)


def test_bf16_is_the_cast_of_float32_and_aliases_are_stored_once(tiny_arch, tmp_path):
    hooks = ["resid_post.0", "resid_pre.1", "final"]
    f32 = cache_activations(tiny_arch, TEXTS, tmp_path / "f32", hooks=hooks, dtype="float32", batch_size=3, progress=False)
    b16 = cache_activations(tiny_arch, TEXTS, tmp_path / "b16", hooks=hooks, dtype="bfloat16", batch_size=3, progress=False)
    a = ew.adapt(tiny_arch)
    # resid_pre(1) is resid_post(0) (same tensor): one stored entry, the other recorded as alias
    assert f32.hooks == [a.hook("resid_post", 0), a.final_resid_hook]
    assert "resid_pre.1" in f32.hook_info[a.hook("resid_post", 0)]["aliases"]
    assert f32.resolve("resid_pre.1") == [a.hook("resid_post", 0)]
    x, y = f32.get(slice(None)), b16.get(slice(None))
    assert y[a.final_resid_hook].dtype == torch.bfloat16
    for h in f32.hooks:
        assert torch.equal(x[h].to(torch.bfloat16), y[h])
    keys = json.loads((tmp_path / "b16" / "manifest.json").read_text())["hooks"]
    assert len(keys) == 2
    # vectors + indices and nothing much else on disk
    raw = len(y) * (2 * a.d_model * 2 + 16)
    assert sum(s["bytes"] for s in b16.manifest["shards"]) < raw + 4096


def test_last_positions_left_padding_and_mask_function(tiny_arch, tmp_path):
    a = ew.adapt(tiny_arch)
    kw = dict(hooks=["final"], dtype="float32", batch_size=6, progress=False)
    right = cache_activations(tiny_arch, TEXTS, tmp_path / "r", positions="last", padding_side="right", **kw)
    left = cache_activations(tiny_arch, TEXTS, tmp_path / "l", positions="last", padding_side="left", **kw)
    assert len(right) == len(left) == len(TEXTS)
    lengths = torch.tensor([len(a.to_tokens(t)) for t in TEXTS])
    r, l = right.get(slice(None)), left.get(slice(None))
    assert torch.equal(r.position.long(), lengths - 1) and torch.equal(l.position.long(), lengths - 1)
    assert torch.allclose(r[a.final_resid_hook], l[a.final_resid_hook], atol=resid_tol(a, r[a.final_resid_hook]), rtol=0)

    def even(tokens, mask):
        return (torch.arange(tokens.shape[1]) % 2 == 0).expand_as(tokens)

    evens = cache_activations(tiny_arch, TEXTS, tmp_path / "e", positions=even, **kw)
    # pad positions are removed even when the mask function selects them
    assert len(evens) == int(((lengths + 1) // 2).sum())
    assert (evens.get(slice(None)).position % 2 == 0).all()


def test_sources_and_metadata(tiny_arch, tmp_path):
    import datasets

    rows = [{"text": t, "label": i % 2, "topic": f"t{i}"} for i, t in enumerate(TEXTS)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    kw = dict(hooks=["final"], positions="last", dtype="float32", batch_size=4, progress=False)
    ref = cache_activations(tiny_arch, TEXTS, tmp_path / "list", metadata=[{"label": r["label"], "topic": r["topic"]} for r in rows], **kw)
    stores = [
        cache_activations(tiny_arch, jsonl, tmp_path / "jsonl", **kw),
        cache_activations(tiny_arch, datasets.Dataset.from_list(rows), tmp_path / "hf", **kw),
        cache_activations(tiny_arch, iter(rows), tmp_path / "gen", **kw),
    ]
    for s in stores:
        assert torch.equal(s.get(slice(None)).stack(), ref.get(slice(None)).stack())
        assert s.prompts[["prompt", "label", "topic"]].equals(ref.prompts[["prompt", "label", "topic"]])
    plain = cache_activations(tiny_arch, txt, tmp_path / "txt", **kw)
    assert torch.equal(plain.get(slice(None)).stack(), ref.get(slice(None)).stack())
    assert (tmp_path / "jsonl" / "metadata.parquet").exists()
    # token ids with a mask give the same rows as the text
    a = ew.adapt(tiny_arch)
    toks, mask = ew.tokenize(a, TEXTS)
    by_ids = cache_activations(tiny_arch, toks, tmp_path / "ids", attention_mask=mask, **kw)
    want = ref.get(slice(None)).stack()
    assert torch.allclose(by_ids.get(slice(None)).stack(), want, atol=resid_tol(a, want), rtol=0)
    with pytest.raises(EmbedwalkError, match="'body'"):
        cache_activations(tiny_arch, jsonl, tmp_path / "bad", text_field="body", **kw)
    with pytest.raises(EmbedwalkError, match="d_model"):
        plan_hooks(tiny_arch, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(EmbedwalkError, match="unknown hook"):
        plan_hooks(tiny_arch, ["resid_post"])


def test_smollm2_store_matches_cache(smollm2, tmp_path):
    a = ew.adapt(smollm2)
    texts = ["The capital of France is", "One, two, three,", "Hi"]
    store = cache_activations(smollm2, texts, tmp_path / "s", layers=[10], batch_size=3, progress=False)
    assert store.hooks == [a.hook("resid_post", 10), a.final_resid_hook]
    assert store.dtype == torch.bfloat16
    got = store.get(slice(None))
    for p, text in enumerate(texts):
        toks, _, ref = _reference(smollm2, text, store.hooks)
        rows = got.prompt == p
        assert torch.equal(got.tokens[rows].long(), toks)
        for h in store.hooks:
            x, r = got[h][rows].float(), ref[h]
            # bf16 keeps 8 significant bits: one rounding (half an ulp, 2**-9 relative) of the
            # padded run's float32 value, which is within resid_tol of the lone prompt's
            tol = resid_tol(a, r)
            assert ((x - r).abs() <= (r.abs() + tol) * 2**-8 + tol).all(), h
    assert open_store(tmp_path / "s").n_prompts == 3
