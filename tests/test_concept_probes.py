"""Probes from class statistics and by streaming L-BFGS; group-fold CV; label controls."""

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from embedwalk.concepts.controls import (
    control_task,
    control_task_labels,
    evaluate_controls,
    permutation_p_value,
    permutation_test,
    probe_cv_scorer,
    shuffle_labels_by_group,
)
from embedwalk.concepts.probes import (
    LinearProbe,
    cross_validate_probe,
    fit_lda_probe,
    fit_logistic_probe,
    fit_mass_mean_probe,
)
from embedwalk.concepts.stats import ClassStats, group_folds, tensor_batches
from embedwalk.errors import EmbedwalkError




def _classes(n=900, p=10, C=3, sep=1.0, seed=0, per_group=5):
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // per_group
    y = rng.integers(0, C, n // per_group)[groups]  # one label per group (entity)
    mix = rng.normal(size=(p, p)) * 0.4 + np.eye(p)
    x = rng.normal(size=(C, p))[y] * sep + rng.normal(size=(n, p)) @ mix + 50.0
    return x, y, groups


def _class_stats(x, y, C):
    cs = ClassStats(C)
    for b in tensor_batches(torch.tensor(x), torch.tensor(y), batch_size=128):
        cs.update(*b)
    return cs


def _numpy_lda(x, y, C, shrinkage):
    n, p = x.shape
    means = np.stack([x[y == c].mean(0) for c in range(C)])
    sw = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(C)) / n
    cov = (1 - shrinkage) * sw + shrinkage * np.trace(sw) / p * np.eye(p)
    W = np.linalg.solve(cov, means.T).T
    priors = np.bincount(y, minlength=C) / n
    return W, -0.5 * (means * W).sum(1) + np.log(priors)


@pytest.mark.parametrize("shrinkage", [0.0, 0.05, 0.5])
def test_lda_matches_numpy_and_sklearn(shrinkage):
    x, y, _ = _classes()
    probe = fit_lda_probe(_class_stats(x, y, 3), shrinkage=shrinkage)
    W, b = _numpy_lda(x, y, 3, shrinkage)
    np.testing.assert_allclose(probe.weight.numpy(), W, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(probe.bias.numpy(), b, rtol=1e-7)
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage or None).fit(x, y)
    np.testing.assert_allclose(probe.weight.numpy(), sk.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(probe.predict(torch.tensor(x)).numpy(), sk.predict(x))


def test_mass_mean_is_nearest_class_mean():
    x, y, _ = _classes(C=2, sep=0.8)
    probe = fit_mass_mean_probe(_class_stats(x, y, 2))
    means = np.stack([x[y == c].mean(0) for c in range(2)])
    np.testing.assert_allclose(probe.direction.numpy(), means[1] - means[0], rtol=1e-10)
    nearest = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(probe.predict(torch.tensor(x)).numpy(), nearest)
    # A class never seen is never predicted.
    p3 = fit_mass_mean_probe(_class_stats(x, y, 3))
    assert p3.counts[2] == 0 and (p3.predict(torch.tensor(x)) != 2).all()


def test_logistic_matches_sklearn():
    x, y, _ = _classes(n=600, p=8, sep=0.6, seed=1)
    C_sk = 0.5
    probe = fit_logistic_probe(tensor_batches(torch.tensor(x), torch.tensor(y), batch_size=300),
                               3, l2=1 / (C_sk * len(x)), dtype=torch.float64, max_iter=200)
    xs = StandardScaler().fit_transform(x)
    sk = LogisticRegression(C=C_sk, max_iter=1000, tol=1e-8).fit(xs, y)
    sk_raw = sk.coef_ / x.std(0)  # our weights are returned in raw units
    np.testing.assert_allclose(probe.weight.numpy(), sk_raw, rtol=1e-4,
                               atol=1e-4 * np.abs(sk_raw).max())
    ours = probe.accuracy(torch.tensor(x), torch.tensor(y))
    assert ours == pytest.approx(sk.score(xs, y), abs=0.005)
    assert ours > 0.7


def _manual_cv(x, y, groups, fit, n_folds=5, seed=0):
    folds = group_folds(groups, n_folds, seed)
    correct = 0
    for f in range(n_folds):
        tr, te = folds != f, folds == f
        probe = fit(_class_stats(x[tr], y[tr], 3))
        correct += (probe.predict(torch.tensor(x[te])).numpy() == y[te]).sum()
    return correct / len(y)


@pytest.mark.parametrize("method", ["lda", "mass_mean"])
def test_cross_validation_uses_group_folds(method):
    x, y, groups = _classes(seed=2)
    batches = tensor_batches(torch.tensor(x), torch.tensor(y), groups, batch_size=100)
    cv = cross_validate_probe(batches, 3, method)
    fit = fit_lda_probe if method == "lda" else fit_mass_mean_probe
    assert cv.accuracy == pytest.approx(_manual_cv(x, y, groups, fit), abs=1e-12)
    df = cv.to_dataframe()
    assert list(df["fold"])[-1] == "all" and df["n_test"].iloc[-1] == len(x)
    assert cv.majority_baseline < cv.accuracy


def test_logistic_cross_validation_is_held_out():
    # Pure noise with one label per group: training accuracy is high (many dims,
    # few groups), held-out accuracy must sit near chance.
    rng = np.random.default_rng(3)
    groups = np.arange(400) // 10
    y = rng.integers(0, 2, 40)[groups]
    x = rng.normal(size=(40, 30))[groups] + 0.1 * rng.normal(size=(400, 30))
    batches = tensor_batches(torch.tensor(x), torch.tensor(y), groups, batch_size=200)
    cv = cross_validate_probe(batches, 2, "logistic", l2=1e-4, max_iter=50)
    assert cv.probe.accuracy(torch.tensor(x), torch.tensor(y)) > 0.95
    assert cv.accuracy < 0.75
    assert sorted(cv.fold_probes) == sorted(set(group_folds(groups, 5, 0).tolist()))


def test_one_shot_iterator_is_rejected_and_probe_roundtrip(tmp_path):
    x, y, _ = _classes(n=100)
    with pytest.raises(TypeError, match="re-iterable"):
        fit_logistic_probe(iter(tensor_batches(torch.tensor(x), torch.tensor(y))), 3)
    probe = fit_lda_probe(_class_stats(x, y, 3))
    probe.save(tmp_path / "p.safetensors")
    back = LinearProbe.load(tmp_path / "p.safetensors")
    np.testing.assert_allclose(back.weight.numpy(), probe.weight.numpy(), rtol=1e-12, atol=0)
    assert back.kind == "lda" and back.meta["shrinkage"] == 0.1
    assert list(probe.to_dataframe().columns) == ["probe", "class", "n_train", "weight_norm", "bias"]


# --------------------------------------------------------------------------- controls


def test_group_shuffle_keeps_groups_whole_and_control_task_is_per_type():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(30), 4)
    labels = rng.integers(0, 3, 30)[groups]
    shuffled = shuffle_labels_by_group(torch.tensor(labels), groups, seed=1)
    assert isinstance(shuffled, torch.Tensor)
    s = shuffled.numpy()
    assert all(len(set(s[groups == g])) == 1 for g in range(30))
    assert sorted(s[::4]) == sorted(labels[::4])  # a permutation of the group labels
    assert not np.array_equal(s, labels)
    with pytest.raises(EmbedwalkError, match="vary within a group"):
        shuffle_labels_by_group(np.arange(120), groups)

    types = rng.integers(0, 12, 120)  # e.g. token ids, repeated across groups
    ctl = control_task_labels(labels, types, seed=2)
    assert all(len(set(ctl[types == t])) == 1 for t in np.unique(types))
    assert set(ctl) <= set(labels)


def test_permutation_p_value_formula():
    assert permutation_p_value(0.9, [0.1, 0.5, 0.95, 0.9]) == pytest.approx(3 / 5)
    np.testing.assert_allclose(permutation_p_value([1.0, 0.0], [[0.5, 0.5], [2.0, -1.0]]),
                               [2 / 3, 2 / 3])


def test_probe_permutation_and_selectivity():
    x, y, groups = _classes(n=400, p=6, sep=1.5, seed=5, per_group=4)
    score = probe_cv_scorer(torch.tensor(x), groups, 3, "lda")
    real = permutation_test(score, y, groups, n_perm=19, seed=0)
    assert real.p_value == pytest.approx(1 / 20)

    rng = np.random.default_rng(6)
    random_labels = rng.integers(0, 3, len(np.unique(groups)))[groups]
    null = permutation_test(score, random_labels, groups, n_perm=19, seed=0)
    assert null.p_value > 0.2

    # Types = groups: the control task gives each entity a random class, so an LDA
    # probe held out by group cannot learn it; selectivity is large.
    ct = control_task(score, y, groups, n_control=5, seed=0)
    assert ct.selectivity > 0.3 and ct.p_value == pytest.approx(1 / 6)
    table = evaluate_controls(score, y, groups, types=groups, n_perm=9, n_control=3)
    assert {"real", "real_p", "shuffled", "control", "control_p", "selectivity",
            "selectivity_p"} <= set(table.columns)
    assert table["real_p"].iloc[0] == pytest.approx(0.1)
