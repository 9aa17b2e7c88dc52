"""Single-layer model, graph-SVM and a reduced-size reproduction of Li et al. (2024)."""

import numpy as np
import pytest
import torch

from embedwalk.priority import (
    TokenDataset,
    build_priority_graphs,
    finite_subspace,
    generate_dataset,
    graph_svm,
    loss_and_grad,
    make_embeddings,
    run_experiment,
    reduced_key_mask,
    reproduce,
    svm_constraints,
)
from embedwalk.priority.single_layer import _Batch, attention


def test_gradient_matches_autograd_with_and_without_key_mask():
    data = generate_dataset(n=7, T=5, K=6, d=8, seed=3, cyclic=True)
    W = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for km in (None, reduced_key_mask(data.sequences, data.labels, data.graphs)):
        batch = _Batch.of(data, km)
        Wg = W.clone().requires_grad_()
        s = attention(Wg, batch)
        loss = -(s * batch.is_label).sum(-1).log().mean()
        loss.backward()
        value, grad = loss_and_grad(W, batch)
        assert value == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(grad, Wg.grad, rtol=1e-10, atol=1e-12)


def test_dataset_generation_rules():
    data = generate_dataset(n=6, T=4, K=6, d=8, seed=0, cyclic=True)
    assert data.graphs.has_cycle()
    assert (data.sequences == data.labels[:, None]).any(1).all()  # label always present
    assert torch.allclose(data.embeddings.norm(dim=1), torch.ones(6, dtype=torch.float64))
    again = generate_dataset(n=6, T=4, K=6, d=8, seed=0, cyclic=True)
    assert np.array_equal(data.sequences, again.sequences) and torch.equal(data.embeddings, again.embeddings)
    with pytest.raises(ValueError, match="K <= d"):
        generate_dataset(n=4, T=3, K=9, d=8)
    with pytest.raises(ValueError, match="label must occur"):
        TokenDataset(np.array([[0, 1]]), np.array([2]), data.embeddings)


def test_svm_exact_on_one_hot_example():
    # One sample X = (0, 1), label 0, query 1: only (e0 - e1)^T W e1 >= 1, i.e. W01 - W11 >= 1.
    # Minimum norm splits the margin: W01 = 1/2, W11 = -1/2.
    seqs, labels = np.array([[0, 1]]), np.array([0])
    cons = svm_constraints(seqs, labels, build_priority_graphs(seqs, labels), np.eye(2))
    W = graph_svm(cons, 2)
    np.testing.assert_allclose(W, [[0, 0.5], [0, -0.5]], atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svm_solution_feasible_and_minimal(seed):
    data = generate_dataset(n=6, T=4, K=6, d=8, seed=seed, cyclic=True)
    cons, emb = data.constraints, data.embeddings.numpy()
    W = graph_svm(cons, 8)
    r = cons.residuals(W)
    assert cons.equal.any() and (~cons.equal).any()
    assert np.abs(r[cons.equal]).max() <= 1e-6
    assert r[~cons.equal].min() >= 1 - 1e-6

    # A feasible alternative from priority levels: W x_k = v_k with x_i^T v_k = -level_k(i),
    # so an edge y -> j across SCCs gains >= 1 and tokens of one SCC tie.
    df = data.graphs.to_dataframe()
    phi = np.zeros((6, 6))  # phi[k, i]
    phi[df.last_token, df.token] = -df.level
    V = np.linalg.pinv(emb) @ phi.T  # column k solves E v_k = phi[k]
    W_alt = V @ np.linalg.pinv(emb.T)  # W E^T = V
    assert cons.violation(W_alt) <= 1e-8
    assert np.linalg.norm(W) <= np.linalg.norm(W_alt) + 1e-6
    # W_svm lives in the complement of S_fin (its equalities are exactly S_fin's span).
    Q = finite_subspace(data.graphs, emb)
    assert Q.shape[1] >= 1
    assert np.linalg.norm(Q.T @ W.ravel()) <= 1e-6


def test_all_equal_constraints_give_zero_svm_and_zero_corr():
    # Query 2 in every sample; edges 0->1, 0->2 (label 0), 2->0 (label 2), 1->2 (label 1):
    # one SCC {0, 1, 2}, so every constraint is an equality and nothing is separated.
    seqs = np.array([[1, 0, 2], [0, 2, 2], [2, 1, 2]])
    data = TokenDataset(seqs, np.array([0, 2, 1]), make_embeddings(3, 3, np.random.default_rng(0)))
    assert data.constraints.equal.all()
    assert not graph_svm(data.constraints, data.d).any()
    run = run_experiment(data, iterations=20, log_every=10)
    assert (run.history.corr_svm == 0).all()


def test_reduced_reproduction_is_seeded_and_hits_targets():
    res = reproduce("cyclic", n_datasets=3, iterations=1500, seed=0, log_every=50)
    hist = res.history
    final = hist[hist.iteration == 1500]
    assert final.corr_svm.mean() >= 0.9
    assert (final.corr_svm > 0.85).all()
    assert final.mass_on_component.mean() >= 0.9  # hard retrieval is well under way
    start = hist[hist.iteration == 0]
    assert start.mass_on_component.mean() < 0.8  # ... and was not there at init
    assert (final.loss.values < start.loss.values).all()
    table = res.to_dataframe()
    assert {"setting", "metric", "mean", "paper", "ok"} <= set(table.columns)
    assert "0.976 - 0.993" in str(res)
    again = reproduce("cyclic", n_datasets=1, iterations=100, seed=0, log_every=50)
    np.testing.assert_array_equal(again.history.corr_svm.values, hist[hist.dataset == 0].corr_svm.values[:3])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown setting"):
        reproduce("cyclical", n_datasets=1, iterations=10)
