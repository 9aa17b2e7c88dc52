"""The model identity is the whole model (every parameter and buffer), and everything the
adapter derives from the weights follows them: a weight edit between two calls is never
served stale, and artefacts of another model (even one with the same unembedding) are refused
by name."""

import dataclasses
import json
import math

import pytest
import torch

import embedwalk as ew
from conftest import Crash, make_tiny
from embedwalk.concepts.features import context_vectors
from embedwalk.concepts.probes import fit_lda_probe
from embedwalk.concepts.stats import ClassStats
from embedwalk.errors import EmbedwalkError
from embedwalk.fingerprint import fingerprint, model_fingerprint, named_tensors
from embedwalk.lenses.tuned import TunedLens
from embedwalk.store import cache_activations, open_store

TEXTS = ["w5 w6 w7 w8 w9 w10", "w11 w12 w13 w14"]
STORE_TEXTS = [" ".join(f"w{(7 * i + j) % 150 + 2}" for j in range(3 + i % 4)) for i in range(24)]
KW = dict(layers=[0], batch_size=4, shard_rows=12, progress=False)


def _body_weight(model) -> tuple[str, torch.Tensor]:
    """A 2-D weight of block 0 that is not the embedding or unembedding."""
    for name, t in named_tensors(model):
        if t.ndim == 2 and ("h.0." in name or "blocks.0." in name or "layers.0." in name) and "mlp" in name:
            return name, t
    raise AssertionError("no block-0 MLP weight")


def _float64_entropy(model, text, layer):
    """Entropy of the logit lens at ``layer``'s resid_post by hand: TransformerLens's own cache,
    the final LayerNorm, W_U and b_U, all in float64."""
    toks = model.to_tokens(text)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[f"blocks.{layer}.hook_resid_post"])
    x = cache[f"blocks.{layer}.hook_resid_post"][0].double()
    ln = model.ln_final
    orig = getattr(ln, "original_component", None)
    w, b, eps = (orig.weight, orig.bias, orig.eps) if orig is not None else (ln.w, ln.b, model.cfg.eps)
    x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.detach().double() + b.detach().double()
    z = x @ model.W_U.detach().double() + model.b_U.detach().double()
    lp = z.log_softmax(-1)
    return -(lp.exp() * lp).sum(-1), z


def _check_lens_follows(model):
    res = ew.logit_lens(model, TEXTS[:1])
    ent, z = _float64_entropy(model, TEXTS[0], 0)
    # float32 logits: each is a d_model-term product, off by at most ~eps * sqrt(d_model) * |z|;
    # the entropy moves by no more than the largest logit error (x4 for the normaliser's own rounding).
    tol = 4 * torch.finfo(torch.float32).eps * math.sqrt(model.cfg.d_model) * (1 + float(z.abs().max()))
    got = res.entropy[1].double()  # readout 1: the output of block 0, a mid-layer readout
    assert (got - ent).abs().max() <= tol, float((got - ent).abs().max())


def _b_U_key(model) -> str:
    ptr = model.b_U.data_ptr()
    return next(k for k, v in model.state_dict().items() if v.data_ptr() == ptr)


@pytest.mark.parametrize("how", ["load_state_dict", "data_copy", "no_grad_inplace"])
def test_a_bias_loaded_after_first_use_is_not_served_stale(how):
    """The issue's case: b_U all zero at first use (cached as absent), then a checkpoint with a
    nonzero b_U is loaded into the same object; mid-layer entropies must follow it."""
    model = make_tiny("gpt2")
    assert not model.b_U.any()
    _check_lens_follows(model)  # first use: the zero bias is cached as absent
    new_b = torch.randn(model.b_U.shape, generator=torch.Generator().manual_seed(1)) * 3
    if how == "load_state_dict":
        sd = model.state_dict()
        sd[_b_U_key(model)] = new_b
        model.load_state_dict(sd)
    elif how == "data_copy":
        model.b_U.data.copy_(new_b)  # does not bump the tensor's version counter
    else:
        with torch.no_grad():
            model.b_U.add_(new_b)
    assert torch.equal(model.b_U.detach(), new_b)
    _check_lens_follows(model)


def test_a_data_edit_rebuilds_the_adapter_and_its_caches():
    from embedwalk.association import probes

    model = make_tiny("llama")
    a = ew.adapt(model)
    parts = a.readout_parts()
    probes.bypass_exact(a)
    assert a in probes._BYPASS
    assert ew.adapt(model) is a  # no change: the cached adapter
    name, w = _body_weight(model)
    w.data[0, 0] += 1.0  # no version bump
    b = ew.adapt(model)
    assert b is not a and b.readout_parts() is not parts
    assert b not in probes._BYPASS  # the probe result of the old weights is not reused
    assert b.fingerprint.digest == model_fingerprint(model) != a.fingerprint.digest
    changed = [n for n in a.fingerprint.tensors if a.fingerprint.tensors[n] != b.fingerprint.tensors[n]]
    assert changed == [name]  # hand count: exactly the edited tensor


def test_fingerprint_covers_every_tensor_once_and_widening_keeps_it():
    model = make_tiny("gpt2")
    roots = [model] + [m for m in [model.__dict__.get("original_model")] if m is not None]
    ids = {id(t) for r in roots for t in list(r.parameters()) + list(r.buffers())}
    fp = fingerprint(model)
    assert len(fp.tensors) == len(ids)  # hand count: every parameter and buffer (and the wrapped HF model's), once
    t = torch.randn(5, 7).to(torch.bfloat16)
    m16, m32 = torch.nn.Linear(7, 5, bias=False), torch.nn.Linear(7, 5, bias=False)
    with torch.no_grad():
        m16.weight.data = t.clone()
        m32.weight.data = t.float()
    assert fingerprint(m16).digest == fingerprint(m32).digest  # bf16 -> fp32 is exact
    m32.weight.data[4, 6] = torch.nextafter(m32.weight.data[4, 6], torch.tensor(2.0))
    assert fingerprint(m16).digest != fingerprint(m32).digest  # one ulp of one element
    swapped = torch.nn.Linear(7, 5, bias=False)
    swapped.weight.data = t.float()[[1, 0, 2, 3, 4]]
    assert fingerprint(swapped).digest != fingerprint(m16).digest  # a row permutation


def _edited_copy(model_kind="gpt2"):
    """The same tiny model and a copy whose body (block 0's MLP) differs, head untouched."""
    model, other = make_tiny(model_kind), make_tiny(model_kind)
    name, w = _body_weight(other)
    with torch.no_grad():
        w.mul_(1.01)
    return model, other, name


def test_store_resume_and_a_complete_store_refuse_a_body_edit(tmp_path):
    model, other, name = _edited_copy()
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="crash"):
        cache_activations(model, STORE_TEXTS, out, readers=[Crash(2, out)], **KW)
    msg = rf"written by another model .*the unembedding matches but the body differs: 1 of \d+ tensors changed, first {name}.*new --out"
    with pytest.raises(EmbedwalkError, match=msg):
        cache_activations(other, STORE_TEXTS, out, **KW)
    done = tmp_path / "done"
    store = cache_activations(model, STORE_TEXTS, done, **KW)
    with pytest.raises(EmbedwalkError, match=msg):
        cache_activations(other, STORE_TEXTS, done, **KW)  # no rows of another model handed back
    assert cache_activations(model, STORE_TEXTS, done, **KW).n_prompts == store.n_prompts
    assert store.manifest["config"]["model"]["fingerprint"]["digest"] == model_fingerprint(model)
    assert store.model_verified and "unverified" not in repr(store)


def test_a_store_without_fingerprint_reads_unverified_and_is_not_resumed(tmp_path):
    from embedwalk.concepts.fitted import describe_identity, identity_of
    from embedwalk.store import manifest as mf

    model = make_tiny("gpt2")
    out = tmp_path / "old"
    cache_activations(model, STORE_TEXTS, out, **KW)
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["model"].pop("fingerprint")
    m["config"]["model"]["W_U_sha256"] = "0" * 64  # as written before fingerprints
    m["config_hash"] = mf.config_hash(m["config"])
    path.write_text(json.dumps(m))
    old = open_store(out)
    assert len(old) > 0 and "model unverified" in describe_identity(identity_of(old)) and "model unverified" in repr(old)
    assert not old.model_verified
    with pytest.raises(EmbedwalkError, match="before embedwalk fingerprinted the whole model.*new --out"):
        cache_activations(model, STORE_TEXTS, out, **KW)


def test_tuned_lens_refuses_a_body_edit_and_an_old_file_is_unverified(tmp_path):
    model, other, name = _edited_copy("llama")
    lens = TunedLens.for_model(model)
    lens.save(tmp_path / "lens")
    assert TunedLens.load(tmp_path / "lens", model).fingerprint == lens.fingerprint
    with pytest.raises(EmbedwalkError, match=rf"the unembedding matches but the body differs: 1 of \d+ tensors changed, first {name}.*train_tuned_lens"):
        TunedLens.load(tmp_path / "lens", other)
    cfg = json.loads((tmp_path / "lens" / "config.json").read_text())
    cfg.pop("fingerprint")
    cfg["unembed_hash"] = None
    (tmp_path / "lens" / "config.json").write_text(json.dumps(cfg))
    old = TunedLens.load(tmp_path / "lens", other)  # still read
    assert "model unverified" in repr(old)


def test_concept_fit_refuses_a_body_edit():
    model, other, name = _edited_copy()
    x = context_vectors(model, STORE_TEXTS, progress=False).at("1").double()
    labels = torch.tensor([i % 2 for i in range(len(STORE_TEXTS))])
    probe = fit_lda_probe(ClassStats(2, source=model).update(x, labels))
    probe.check_compatible(model)
    with pytest.raises(EmbedwalkError, match=rf"the models differ \(the unembedding matches but the body differs: 1 of \d+ tensors changed, first {name}\).*Refit"):
        probe.check_compatible(other)
    # a fit from before fingerprints (unembedding hash only) is still used, and says unverified
    old_ident = {k: v for k, v in probe.fitted_in.items() if k != "fingerprint"} | {"W_U_sha256": "0" * 64}
    old = dataclasses.replace(probe, fitted_in=old_ident)
    old.check_compatible(other)
    assert "model unverified" in repr(old)
    torch.testing.assert_close(old.logits(x, source=model), probe.logits(x, source=model))
