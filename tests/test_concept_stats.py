"""Streaming statistics: exactness, merging, group folds, distributed reduction, persistence."""

import json
import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch

from embedwalk.errors import EmbedwalkError
from embedwalk.concepts.stats import (
    ClassStats,
    FoldedStats,
    MomentStats,
    group_folds,
    tensor_batches,
)



def _centred_reference(x: np.ndarray, y: np.ndarray):
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    return x.mean(0), y.mean(0), xc.T @ xc, xc.T @ yc, yc.T @ yc


def _assert_matches(stats: MomentStats, x, y, rtol=1e-10):
    mx, my, sxx, sxy, syy = _centred_reference(x, y)
    assert stats.n == len(x)
    np.testing.assert_allclose(stats.mean_x.numpy(), mx, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(stats.mean_y.numpy(), my, rtol=rtol, atol=1e-12)
    for got, ref in ((stats.sxx, sxx), (stats.sxy, sxy), (stats.syy, syy)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def _data(n=1000, p=6, q=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 5, p) + rng.normal(size=p) * 3
    y = x @ rng.normal(size=(p, q)) + rng.normal(size=(n, q))
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_moments_match_float64_reference(dtype):
    x, y = _data()
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    stats = MomentStats()
    for s in range(0, len(x), 137):  # uneven batches
        stats.update(xt[s : s + 137], yt[s : s + 137])
    # The reference sees exactly the values the accumulator saw (after rounding to dtype).
    _assert_matches(stats, xt.double().numpy(), yt.double().numpy())
    assert stats.sxx.dtype == torch.float64


def test_offset_300_float32_is_exact_where_raw_moments_fail():
    rng = np.random.default_rng(1)
    n, p = 20_000, 8
    x = (300 + rng.normal(size=(n, p)) * 0.5).astype(np.float32)
    y = (300 + x[:, :2] - 300 + 0.1 * rng.normal(size=(n, 2))).astype(np.float32)
    _, _, ref_sxx, ref_sxy, _ = _centred_reference(x, y)

    stats = MomentStats()
    raw_xx = torch.zeros(p, p)  # what a naive float32 raw-moment accumulator does
    raw_sum = torch.zeros(p)
    for s in range(0, n, 1000):
        xb = torch.from_numpy(x[s : s + 1000])
        stats.update(xb, torch.from_numpy(y[s : s + 1000]))
        raw_xx += xb.T @ xb
        raw_sum += xb.sum(0)
    naive = (raw_xx - torch.outer(raw_sum, raw_sum) / n).double().numpy()

    def rel(a, b):
        return np.abs(a - b).max() / np.abs(b).max()

    assert rel(naive, ref_sxx) > 1e-2  # the failure mode this guards against is real
    assert rel(stats.sxx.numpy(), ref_sxx) < 1e-9
    assert rel(stats.sxy.numpy(), ref_sxy) < 1e-9
    np.testing.assert_allclose(stats.mean_x.numpy(), x.astype(np.float64).mean(0), rtol=1e-12)


def test_merge_of_split_batches_equals_single_pass():
    x, y = _data(900)
    single = MomentStats().update(torch.tensor(x), torch.tensor(y))
    cuts = [0, 1, 7, 300, 301, 650, 900]
    parts = [MomentStats().update(torch.tensor(x[a:b]), torch.tensor(y[a:b]))
             for a, b in zip(cuts, cuts[1:])]
    # Merge in a tree order, not left to right, and through an empty accumulator.
    left = parts[0] + parts[1] + MomentStats() + parts[2]
    right = MomentStats().merge(parts[3]).merge(parts[4] + parts[5])
    merged = left.merge(right)
    for k in ("mean_x", "mean_y", "sxx", "sxy", "syy"):
        np.testing.assert_allclose(getattr(merged, k).numpy(), getattr(single, k).numpy(),
                                   rtol=1e-12, atol=1e-9)
    assert merged.n == single.n
    _assert_matches(merged, x, y)


def test_x_only_and_covariances():
    x, _ = _data(300)
    s = MomentStats().update(torch.tensor(x))
    assert s.n_targets == 0
    np.testing.assert_allclose(s.cov_xx().numpy(), np.cov(x.T), rtol=1e-10)
    with pytest.raises(EmbedwalkError):
        s.update(torch.zeros(4, x.shape[1] + 1))


def test_group_folds_deterministic_and_group_pure():
    ints = np.arange(1000)
    f0 = group_folds(ints, 5, seed=0)
    assert np.array_equal(f0, group_folds(torch.tensor(ints), 5, seed=0))
    assert not np.array_equal(f0, group_folds(ints, 5, seed=1))
    assert set(f0) == set(range(5)) and np.bincount(f0).min() > 150  # roughly balanced
    strs = np.array([f"prompt-{i}" for i in range(500)])
    fs0 = group_folds(strs, 4, seed=3)
    assert np.array_equal(fs0, group_folds(list(strs), 4, seed=3))
    assert np.bincount(fs0).min() > 80


def test_group_folds_golden_values():
    # Fixed values: fold assignment must not change across processes, sessions or
    # releases (a saved FoldedStats would silently mix folds otherwise).
    assert group_folds(["paris", "london", "prompt-7", "0", "é"], 5, 0).tolist() == [0, 0, 1, 4, 3]
    assert group_folds([0, 1, 2, 3, -1, 2**40], 5, 0).tolist() == [0, 0, 2, 4, 1, 0]
    assert group_folds([0, 1, 2, 3, -1, 2**40], 5, 9).tolist() == [1, 3, 1, 3, 1, 0]


def test_folded_stats_never_split_a_group_across_batches():
    rng = np.random.default_rng(2)
    n, n_groups = 2400, 60
    groups = rng.integers(0, n_groups, n)  # rows of a group scattered over many batches
    x, y = _data(n)
    fs = FoldedStats(5, seed=7)
    order = rng.permutation(n)
    for s in range(0, n, 256):
        idx = order[s : s + 256]
        fs.update(torch.tensor(x[idx]), torch.tensor(y[idx]), groups=groups[idx])
    folds = group_folds(groups, 5, seed=7)
    for g in range(n_groups):  # each group has exactly one fold
        assert len(set(folds[groups == g])) == 1
    for f in range(5):  # and each fold's stats hold exactly the rows of its groups
        rows = folds == f
        if rows.sum():
            _assert_matches(fs.test(f), x[rows], y[rows])
            _assert_matches(fs.train(f), x[~rows], y[~rows])
    _assert_matches(fs.total(), x, y)
    with pytest.raises(EmbedwalkError, match="groups"):
        fs.update(torch.tensor(x[:5]), torch.tensor(y[:5]))


def test_class_stats_match_numpy_and_merge():
    rng = np.random.default_rng(3)
    n, p, C = 800, 5, 4
    labels = rng.integers(0, C - 1, n)  # class 3 never appears
    x = rng.normal(size=(n, p)) + labels[:, None] * 2.0 + 100
    cs = ClassStats(C)
    halves = [ClassStats(C), ClassStats(C)]
    for i, b in enumerate(tensor_batches(torch.tensor(x), torch.tensor(labels), batch_size=97)):
        cs.update(*b)
        halves[i % 2].update(*b)
    merged = halves[0].merge(halves[1])
    sw = np.zeros((p, p))
    for c in range(C):
        xc = x[labels == c]
        if len(xc):
            np.testing.assert_allclose(cs.means[c].numpy(), xc.mean(0), rtol=1e-12)
            sw += (xc - xc.mean(0)).T @ (xc - xc.mean(0))
    for s in (cs, merged):
        np.testing.assert_allclose(s.counts.numpy(), np.bincount(labels, minlength=C))
        np.testing.assert_allclose(s.sw.numpy(), sw, rtol=1e-10)
    xc = x - x.mean(0)
    np.testing.assert_allclose(cs.total_scatter().numpy(), xc.T @ xc, rtol=1e-10)


def test_save_load_roundtrip_without_pickle(tmp_path):
    x, y = _data(500)
    groups = np.repeat(np.arange(50), 10)
    fs = FoldedStats(3, seed=1).update(torch.tensor(x), torch.tensor(y), groups)
    fs.save(tmp_path / "fs.safetensors")
    back = FoldedStats.load(tmp_path / "fs.safetensors")
    assert (back.n_folds, back.seed, back.counts) == (fs.n_folds, fs.seed, fs.counts)
    for a, b in zip(fs.folds, back.folds):
        np.testing.assert_allclose(a.sxy.numpy(), b.sxy.numpy(), rtol=0, atol=0)

    labels = (x[:, 0] > x[:, 0].mean()).astype(int)
    cfs = FoldedStats(3, 1, accumulator=lambda: ClassStats(2, class_names=["lo", "hi"]))
    cfs.update(torch.tensor(x), torch.tensor(labels), groups)
    cfs.save(tmp_path / "cfs.safetensors")
    cback = FoldedStats.load(tmp_path / "cfs.safetensors")
    assert isinstance(cback.folds[0], ClassStats) and cback.folds[0].class_names == ["lo", "hi"]
    np.testing.assert_allclose(cback.total().sw.numpy(), cfs.total().sw.numpy(), rtol=1e-12)

    ms = MomentStats().update(torch.tensor(x))
    ms.save(tmp_path / "ms.safetensors")
    raw = (tmp_path / "ms.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors layout
    assert json.loads(header["__metadata__"]["embedwalk"])["class"] == "MomentStats"
    assert MomentStats.load(tmp_path / "ms.safetensors").n == 500
    with pytest.raises(EmbedwalkError):
        ClassStats.load(tmp_path / "ms.safetensors")


def _worker(rank: int, port: int, data: str, out: str) -> None:
    # torchrun-style environment, then the env:// rendezvous of init_process_group.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    d = np.load(data)
    x, y, lab, groups = d["x"], d["y"], d["lab"], d["groups"]
    mine = np.flatnonzero(np.arange(len(x)) % 2 == rank)  # interleaved shard per rank
    strs = np.array([f"g{g}" for g in groups])
    ms = MomentStats(x.shape[1], y.shape[1])
    fs = FoldedStats(4, seed=5)
    cs = ClassStats(3, x.shape[1])
    for s in range(0, len(mine), 64):
        idx = mine[s : s + 64]
        ms.update(torch.tensor(x[idx]), torch.tensor(y[idx]))
        fs.update(torch.tensor(x[idx]), torch.tensor(y[idx]), groups=strs[idx])
        cs.update(torch.tensor(x[idx]), torch.tensor(lab[idx]))
    lonely = MomentStats()  # only rank 0 feeds it: rank 1 must still join the reduction
    if rank == 0:
        lonely.update(torch.tensor(x[:100]), torch.tensor(y[:100]))
    ms.all_reduce()
    fs.all_reduce()
    cs.all_reduce()
    lonely.all_reduce()
    if rank == 1:
        lonely.save(f"{out}/lonely.safetensors")
    if rank == 0:
        ms.save(f"{out}/ms.safetensors")
        fs.save(f"{out}/fs.safetensors")
        cs.save(f"{out}/cs.safetensors")
    dist.destroy_process_group()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods() or not torch.distributed.is_available(),
    reason="needs fork and torch.distributed",
)
def test_two_process_gloo_all_reduce_equals_single_process(tmp_path):
    x, y = _data(1200, p=5, q=2, seed=4)
    x = x + 300.0  # far from zero: a raw-moment reduction would show here
    lab = (np.arange(1200) * 7) % 3
    groups = np.arange(1200) // 8
    np.savez(tmp_path / "data.npz", x=x, y=y, lab=lab, groups=groups)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported torch, so the test takes ~1 s, not ~15.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path / "data.npz"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"

    ms = MomentStats.load(tmp_path / "ms.safetensors")
    _assert_matches(ms, x, y, rtol=1e-9)
    _assert_matches(MomentStats.load(tmp_path / "lonely.safetensors"), x[:100], y[:100], rtol=1e-9)

    strs = np.array([f"g{g}" for g in groups])
    ref = FoldedStats(4, seed=5).update(torch.tensor(x), torch.tensor(y), groups=strs)
    got = FoldedStats.load(tmp_path / "fs.safetensors")
    assert got.counts == ref.counts
    for a, b in zip(got.folds, ref.folds):
        np.testing.assert_allclose(a.sxx.numpy(), b.sxx.numpy(), rtol=1e-9, atol=1e-7)
        np.testing.assert_allclose(a.sxy.numpy(), b.sxy.numpy(), rtol=1e-9, atol=1e-7)

    cref = ClassStats(3).update(torch.tensor(x), torch.tensor(lab))
    cgot = ClassStats.load(tmp_path / "cs.safetensors")
    np.testing.assert_allclose(cgot.counts.numpy(), cref.counts.numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(cgot.means.numpy(), cref.means.numpy(), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(cgot.sw.numpy(), cref.sw.numpy(), rtol=1e-9, atol=1e-7)
