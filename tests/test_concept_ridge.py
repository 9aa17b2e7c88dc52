"""Ridge from statistics: agreement with scikit-learn, analytic CV, R², persistence, controls."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from embedwalk.errors import EmbedwalkError
from embedwalk.concepts.controls import permutation_test, ridge_cv_scorer
from embedwalk.concepts.ridge import RidgeFit, fit_ridge, heldout_sse, ridge_path
from embedwalk.concepts.stats import FoldedStats, MomentStats, group_folds




def _problem(n=600, p=12, q=5, seed=0, noise=(0.5, 1, 2, 4, 8)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) * 0.5 + rng.normal(size=p) * 5
    B = rng.normal(size=(p, q)) * (rng.uniform(size=(p, q)) < 0.5)
    y = x @ B + 3.0 + rng.normal(size=(n, q)) * np.asarray(noise)[:q]
    groups = np.arange(n) // 6  # six rows per prompt
    return x, y, groups


def _stream(x, y, groups=None, n_folds=5, seed=0, batch=97):
    acc = MomentStats() if groups is None else FoldedStats(n_folds, seed)
    for s in range(0, len(x), batch):
        sl = slice(s, s + batch)
        if groups is None:
            acc.update(torch.tensor(x[sl]), torch.tensor(y[sl]))
        else:
            acc.update(torch.tensor(x[sl]), torch.tensor(y[sl]), groups=groups[sl])
    return acc


@pytest.mark.parametrize("alpha", [1e-3, 0.3, 10.0, 1e3, 1e5])
def test_coefficients_match_sklearn(alpha):
    x, y, _ = _problem()
    fit = fit_ridge(_stream(x, y), alpha)
    sk = Ridge(alpha=alpha, fit_intercept=True).fit(x, y)
    np.testing.assert_allclose(fit.coef.numpy(), sk.coef_.T, rtol=1e-5,
                               atol=1e-5 * np.abs(sk.coef_).max())
    np.testing.assert_allclose(fit.intercept.numpy(), sk.intercept_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(fit.predict(torch.tensor(x)).numpy(), sk.predict(x), rtol=1e-6,
                               atol=1e-8)


def test_wide_problem_and_reverse_direction_match_sklearn():
    # Concept features -> vectors: few input columns, many outputs (and p > n on the side).
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(40, 3))
    vecs = feats @ rng.normal(size=(3, 64)) + rng.normal(size=(40, 64))
    for x, y in ((feats, vecs), (vecs, feats)):  # both directions, the second with p > n
        fit = fit_ridge(MomentStats().update(torch.tensor(x), torch.tensor(y)), 2.0)
        sk = Ridge(alpha=2.0).fit(x, y)
        np.testing.assert_allclose(fit.coef.numpy(), sk.coef_.T, rtol=1e-5,
                                   atol=1e-6 * np.abs(sk.coef_).max())


def test_path_equals_individual_fits_and_heldout_sse_is_direct():
    x, y, _ = _problem(seed=2)
    stats = _stream(x[:400], y[:400])
    alphas = [0.1, 10.0, 1000.0]
    coefs, intercepts = ridge_path(stats, alphas)
    test = _stream(x[400:], y[400:])
    for a, B, b in zip(alphas, coefs, intercepts):
        sk = Ridge(alpha=a).fit(x[:400], y[:400])
        np.testing.assert_allclose(B.numpy(), sk.coef_.T, rtol=1e-5, atol=1e-9)
        direct = ((y[400:] - sk.predict(x[400:])) ** 2).sum(0)
        np.testing.assert_allclose(heldout_sse(B, b, test).numpy(), direct, rtol=1e-8)


def _brute_force_cv(x, y, folds, alphas):
    """k-fold loop with scikit-learn on the same folds: pooled SSE [A, q] and OOF predictions."""
    sse = np.zeros((len(alphas), y.shape[1]))
    oof = np.zeros((len(alphas),) + y.shape)
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        for i, a in enumerate(alphas):
            pred = Ridge(alpha=a).fit(x[tr], y[tr]).predict(x[te])
            oof[i][te] = pred
            sse[i] += ((y[te] - pred) ** 2).sum(0)
    return sse, oof


def test_cv_alpha_selection_equals_brute_force_sklearn_loop():
    x, y, groups = _problem(n=720, seed=3)
    alphas = np.logspace(-2, 5, 12)
    fs = _stream(x, y, groups, n_folds=5, seed=3)
    fit = fit_ridge(fs, alphas)
    folds = group_folds(groups, 5, seed=3)
    sse, oof = _brute_force_cv(x, y, folds, alphas)

    np.testing.assert_allclose(fit.cv_mse.numpy(), sse / len(x), rtol=1e-7)
    best = sse.argmin(0)
    np.testing.assert_array_equal(fit.alpha.numpy(), alphas[best])
    assert len(set(best.tolist())) > 1  # noise levels differ, so the chosen alphas do too
    # Held-out R² is r2_score of the out-of-fold predictions at the chosen alphas.
    ref_r2 = [r2_score(y[:, j], oof[best[j]][:, j]) for j in range(y.shape[1])]
    np.testing.assert_allclose(fit.cv_r2.numpy(), ref_r2, rtol=1e-7)
    # The final model is the full-data fit at the chosen alphas.
    for j in range(y.shape[1]):
        sk = Ridge(alpha=alphas[best[j]]).fit(x, y[:, j])
        np.testing.assert_allclose(fit.coef[:, j].numpy(), sk.coef_, rtol=1e-5, atol=1e-9)

    shared = fit_ridge(fs, alphas, alpha_per_target=False)
    assert (shared.alpha == float(alphas[sse.sum(1).argmin()])).all()
    pooled = 1 - sse[sse.sum(1).argmin()].sum() / ((y - y.mean(0)) ** 2).sum()
    assert shared.cv_r2_overall == pytest.approx(pooled, rel=1e-9)


def test_r2_matches_sklearn_on_heldout_stats():
    x, y, _ = _problem(seed=4)
    fit = fit_ridge(_stream(x[:450], y[:450]), 5.0)
    test = _stream(x[450:], y[450:])
    pred = fit.predict(torch.tensor(x[450:])).numpy()
    np.testing.assert_allclose(fit.r2(test).numpy(),
                               r2_score(y[450:], pred, multioutput="raw_values"), rtol=1e-8)
    assert fit.r2_overall(test) == pytest.approx(
        r2_score(y[450:], pred, multioutput="variance_weighted"), rel=1e-8)


def test_streaming_many_batches_equals_in_memory():
    # The fit never sees rows, only statistics: 200 small batches give the in-memory answer.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8000, 10)).astype(np.float32)
    y = (x @ rng.normal(size=(10, 3)) + rng.normal(size=(8000, 3))).astype(np.float32)
    groups = np.arange(8000) // 10
    fs = _stream(x, y, groups, batch=40)
    fit = fit_ridge(fs, [0.1, 100.0])
    sk = Ridge(alpha=float(fit.alpha[0])).fit(x.astype(np.float64), y[:, 0].astype(np.float64))
    np.testing.assert_allclose(fit.coef[:, 0].numpy(), sk.coef_, rtol=1e-5, atol=1e-7)
    assert fit.predict(torch.tensor(x[:3])).dtype == torch.float32
    assert fit.predict(torch.tensor(x[:3]).half()).dtype == torch.float32


def test_result_object_dataframe_plot_and_roundtrip(tmp_path):
    x, y, groups = _problem(seed=6)
    fit = fit_ridge(_stream(x, y, groups), target_names=list("abcde"))  # default alpha grid
    df = fit.to_dataframe()
    assert list(df["target"]) == list("abcde")
    assert {"alpha", "cv_r2", "cv_mse", "train_r2", "cv_r2_fold_std"} <= set(df.columns)
    assert (df["cv_r2"] <= df["train_r2"] + 1e-12).all()
    ax = fit.plot()
    assert ax.get_xscale() == "log" and len(ax.lines) >= 2 * fit.n_targets
    fit.save(tmp_path / "fit.safetensors")
    back = RidgeFit.load(tmp_path / "fit.safetensors")
    np.testing.assert_allclose(back.coef.numpy(), fit.coef.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(back.cv_r2.numpy(), fit.cv_r2.numpy(), rtol=1e-12, atol=0)
    assert back.target_names == list("abcde") and back.cv_r2_overall == fit.cv_r2_overall
    with pytest.raises(EmbedwalkError):
        fit_ridge(_stream(x, y), [1.0, 2.0])  # plain stats cannot choose among alphas


def test_ridge_permutation_p_values():
    rng = np.random.default_rng(7)
    n_groups, per = 60, 4
    groups = np.repeat(np.arange(n_groups), per)
    value = rng.normal(size=n_groups)  # one concept value per entity
    x = torch.tensor(value[groups, None] * rng.normal(size=(1, 8)) + rng.normal(size=(len(groups), 8)))
    real = value[groups][:, None]
    noise = rng.normal(size=n_groups)[groups][:, None]
    score = ridge_cv_scorer(x, groups, alphas=[1.0, 100.0])
    hit = permutation_test(score, real, groups, n_perm=19, seed=0)
    miss = permutation_test(score, noise, groups, n_perm=19, seed=0)
    assert hit.p_value[0] == pytest.approx(1 / 20)  # nothing in the null beats real structure
    assert miss.p_value[0] > 0.2
    assert set(hit.to_dataframe().columns) >= {"real", "null_mean", "p_value"}
