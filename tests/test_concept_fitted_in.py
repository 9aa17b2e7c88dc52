"""Concept fits (probes, ridge maps, moments) record the model and residual basis they were
fitted on, keep it through save/load, and refuse activations or statistics of another one."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import GENERATION, make_tiny
from embedwalk.concepts.features import context_vectors
from embedwalk.concepts.probes import LinearProbe, fit_lda_probe, fit_logistic_probe
from embedwalk.concepts.ridge import RidgeFit, fit_ridge
from embedwalk.concepts.stats import ClassStats, FoldedStats, MomentStats, save_tensors, tensor_batches
from embedwalk.errors import EmbedwalkError

TEXTS = [" ".join(f"w{(5 * i + j) % 150 + 2}" for j in range(3 + i % 4)) for i in range(24)]
LABELS = torch.tensor([i % 2 for i in range(24)])
BASES = r"fitted on .*raw \(the Hugging Face model's own residual stream\).*processed weights \(.*centred residual"


@pytest.fixture(scope="module")
def raw():
    return make_tiny("gpt2")


@pytest.fixture(scope="module")
def processed():
    """The same tiny model with TransformerLens weight processing: a bridge's compatibility
    mode on TL 4, process_weights_() on TL 3."""
    model = make_tiny("gpt2")
    if GENERATION == "bridge":
        model.enable_compatibility_mode()
    else:
        model.process_weights_()
    return model


def _x(model):
    return context_vectors(model, TEXTS, progress=False).at("1").double()


def test_probe_and_ridge_record_the_basis_and_refuse_another(raw, processed, tmp_path):
    x = _x(raw)
    stats = ClassStats(2, source=raw).update(x, LABELS)
    probe = fit_lda_probe(stats)
    assert probe.fitted_in["residual_basis"]["processed"] is False
    probe.save(tmp_path / "p.safetensors")
    back = LinearProbe.load(tmp_path / "p.safetensors")
    assert back.fitted_in == probe.fitted_in
    # applied to activations of the raw model it was fitted on: the same numbers
    x_again = _x(raw)
    torch.testing.assert_close(back.logits(x_again, source=raw), x @ probe.weight.T + probe.bias, rtol=1e-12, atol=1e-12)
    # the processed twin's activations are another basis (centred): refused, naming both bases
    x_proc = _x(processed)
    assert not torch.allclose(x_proc, x_again)  # a silent application would give other numbers
    with pytest.raises(EmbedwalkError, match=BASES + r".*enable_compatibility_mode.*refit"):
        back.predict(x_proc, source=processed)
    with pytest.raises(EmbedwalkError, match=BASES):
        back.check_compatible(processed)

    ms = MomentStats(source=raw).update(x, LABELS.double())
    ridge = fit_ridge(ms, 1.0)
    ridge.save(tmp_path / "r.safetensors")
    rback = RidgeFit.load(tmp_path / "r.safetensors")
    torch.testing.assert_close(rback.predict(x_again, source=raw), x @ ridge.coef + ridge.intercept, rtol=1e-12, atol=1e-12)
    with pytest.raises(EmbedwalkError, match=BASES):
        rback.predict(x_proc, source=processed)
    # the identity is the one store manifests and tuned lenses record, in the file's JSON
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["embedwalk"])
    assert set(meta["fitted_in"]) >= {"name", "d_model", "fingerprint", "residual_basis"}

    lg = fit_logistic_probe(tensor_batches(x, LABELS), 2, source=raw, max_iter=5)
    with pytest.raises(EmbedwalkError, match=BASES):
        lg.accuracy(x_proc, LABELS, source=processed)


def test_merging_statistics_of_two_bases_is_refused(raw, processed, tmp_path):
    x, x_proc = _x(raw), _x(processed)
    a = MomentStats(source=raw).update(x, x[:, :2])
    b = MomentStats(source=processed).update(x_proc, x_proc[:, :2])
    with pytest.raises(EmbedwalkError, match=r"merged with statistics of"):
        a.merge(b)
    assert a.n == len(TEXTS)  # nothing was merged
    groups = np.arange(len(TEXTS))
    fa = FoldedStats(3, source=raw).update(x, x[:, :2], groups=groups)
    fb = FoldedStats(3, source=processed).update(x_proc, x_proc[:, :2], groups=groups)
    fb.save(tmp_path / "fb.safetensors")
    with pytest.raises(EmbedwalkError, match=BASES):
        fa.merge(FoldedStats.load(tmp_path / "fb.safetensors"))
    ca = ClassStats(2, source=raw).update(x, LABELS)
    cb = ClassStats(2, source=processed).update(x_proc, LABELS)
    with pytest.raises(EmbedwalkError, match="merged with"):
        ca + cb
    # an empty accumulator of another model is refused too (it would relabel the data)
    with pytest.raises(EmbedwalkError):
        MomentStats(source=processed).merge(a)
    # same basis: merges, and the union keeps the identity
    assert (a + MomentStats(source=raw).update(x, x[:, :2])).fitted_in == a.fitted_in
    assert fit_ridge(fa).fitted_in == a.fitted_in


def test_another_model_in_the_same_basis_is_refused_as_another_model(raw, tmp_path):
    """Both raw, other weights: the message names the models' difference, not the bases, and does
    not point at compatibility mode; each class is named in the singular."""
    other = make_tiny("gpt2", seed=1)
    x, x_other = _x(raw), _x(other)
    model_msg = r"fitted on \S+ \(d_model=64, fingerprint \w+\.\.\.\).*the models differ \(the weights differ, the unembedding among them: \d+ of \d+ tensors changed.*\).*Refit"
    probe = fit_lda_probe(ClassStats(2, source=raw).update(x, LABELS))
    checks = {
        "this LinearProbe was": lambda: probe.predict(x_other, source=other),
        "this MomentStats object was": lambda: MomentStats(source=raw).update(x, x[:, :1]).merge(
            MomentStats(source=other).update(x_other, x_other[:, :1])),
        "this FoldedStats object was": lambda: FoldedStats(3, source=raw).update(x, x[:, :1], groups=np.arange(24)).merge(
            FoldedStats(3, source=other).update(x_other, x_other[:, :1], groups=np.arange(24))),
    }
    for what, call in checks.items():
        with pytest.raises(EmbedwalkError, match=what + " " + model_msg) as err:
            call()
        assert "raw" not in str(err.value) and "compatibility" not in str(err.value)
    with pytest.raises(EmbedwalkError, match=r"their d_model differs"):
        probe.check_compatible({**probe.fitted_in, "d_model": 32})


def test_a_fit_without_identity_is_accepted_and_says_unknown(raw, tmp_path):
    """Files from before identities were recorded (and fits from plain tensors) are accepted
    everywhere; the repr says the origin is unknown."""
    x = _x(raw)
    probe = fit_lda_probe(ClassStats(2).update(x, LABELS))
    t = {"weight": probe.weight, "bias": probe.bias}
    save_tensors(tmp_path / "old.safetensors", t, {"class": "LinearProbe", "format_version": 1, "kind": "lda",
                                                   "class_names": None, "meta": {}})
    old = LinearProbe.load(tmp_path / "old.safetensors")
    assert old.fitted_in is None and "an unknown model and residual basis" in repr(old)
    torch.testing.assert_close(old.logits(x, source=raw), probe.logits(x))
    known = MomentStats(source=raw).update(x, x[:, :1])
    assert (known + MomentStats().update(x, x[:, :1])).fitted_in is None  # unknown rows: unknown union
    assert "unknown" in repr(MomentStats())
