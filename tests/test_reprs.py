"""Every result prints as a short summary: bounded in lines, with its headline numbers shown."""

import numpy as np
import pandas as pd
import pytest
import torch

import embedwalk as ew
from embedwalk._summary import MAX_LINES
from embedwalk.concepts.experiments import ConceptTable, layer_probes, token_regression
from embedwalk.concepts.ridge import fit_ridge
from embedwalk.concepts.stats import FoldedStats

TEXTS = ["w5 w6 w7 w8 w9", "w10 w11 w12"]


def _short(obj, *must_contain):
    text = repr(obj)
    assert len(text.splitlines()) <= MAX_LINES, text
    assert "..." not in text.replace("... ", "").replace(" ...", "") or "more rows" in text, text
    for piece in must_contain:
        assert piece in text, (piece, text)
    assert repr(obj) == str(obj) or len(str(obj).splitlines()) <= MAX_LINES
    return text


def test_lens_results_print_short_summaries(tiny_arch):
    lens = ew.logit_lens(tiny_arch, TEXTS)
    kl = lens.layer_means("kl_to_final")
    _short(lens, "LogitLensResult", f"embed: {float(kl[0]):.3g}", f"{lens.top_ids.shape[1]} rows")
    walk = ew.walk_lens(tiny_arch, TEXTS[0])
    _short(walk, "WalkResult", f"{float(walk.straightness[0]):.3f}")
    dec = ew.decompose(tiny_arch, TEXTS[0], token="w7")
    _short(dec, "DecompositionResult", f"{dec.logit:.4g}")
    gen = ew.decoding_walk(tiny_arch, TEXTS[1], max_new_tokens=3)
    _short(gen, "DecodingWalk", f"{float(gen.path_logprob[-1]):.3f}")


def test_ridge_fit_repr_is_short_with_r2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 400))
    y = x[:, :3] @ rng.normal(size=(3, 3)) + rng.normal(size=(300, 3))
    acc = FoldedStats(5, 0)
    acc.update(torch.tensor(x), torch.tensor(y), groups=np.arange(300) // 3)
    fit = fit_ridge(acc)
    text = _short(fit, "400 features -> 3 targets", f"overall {fit.cv_r2_overall:.4g}")
    assert len(text.splitlines()) < 12


def _planted_table(n=12):
    words = [f"w{10 + i}" for i in range(2 * n)]
    label = np.r_[np.zeros(n, int), np.ones(n, int)]
    return ConceptTable("planted", words, pd.DataFrame({"f": label.astype(float), "g": rng_col(2 * n)}), label,
                        ["a", "b"], np.r_[np.arange(n), np.arange(n)])


def rng_col(n):
    return np.random.default_rng(1).normal(size=n)


@pytest.fixture(scope="module")
def tiny_gpt2():
    from embedwalk.testing import installed_generation, tiny_model

    return tiny_model("gpt2", installed_generation())


def test_concept_results_show_r2_and_accuracy_columns(tiny_gpt2):
    table = _planted_table()
    reg = token_regression(tiny_gpt2, [table], kinds=["embed"], n_perm=3)
    allrows = reg.table[reg.table.target == "all"]
    text = _short(reg, "cv_r2", "p_value", f"{allrows.cv_r2.iloc[0]:.3f}")
    assert "null_q95" in text
    probes = layer_probes(tiny_gpt2, [table], templates=("w3 {}",), n_perm=3, n_control=2,
                          random_baseline=False, points=[0, -1], progress=False)
    best = probes.table[probes.table.model == "trained"].real.max()
    _short(probes, "real", "selectivity", f"{best:.3f}")


def test_tuned_lens_swap_effect_and_sweep_table(tiny_gpt2):
    from embedwalk.association.measure import downstream, sweep
    from embedwalk.lenses.tuned import TunedLens

    lens = TunedLens.for_model(tiny_gpt2)
    text = _short(lens, "TunedLens", f"d_model {tiny_gpt2.cfg.d_model}", "readouts (", "embed", "basis: raw")
    assert len(text.splitlines()) <= 6 and "ParameterList" not in text
    assert len(list(lens.parameters())) == 2 * len(lens.labels) and set(lens.state_dict())  # still an nn.Module
    eff = downstream(tiny_gpt2, TEXTS, targets=[0])
    _short(eff, "SwapEffect", f"delta loss {eff.delta_loss:+.4g} nats", f"KL(original || swapped) {eff.kl:.4g}",
           f"top-1 agreement {eff.top1_agreement:.1%}", f"cosine {eff.composite_cosine:.4f}")
    table = sweep(tiny_gpt2, TEXTS).table
    assert str(table.layer.dtype) == "Int64" and str(table["head"].dtype) == "Int64"
    heads = table[table.unit == "head"]
    assert heads.layer.tolist() == [l for l in range(2) for _ in range(int(heads["head"].max()) + 1)]
    assert table["head"].isna().sum() == (table.unit != "head").sum()
