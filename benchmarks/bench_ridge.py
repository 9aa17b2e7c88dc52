"""Ridge alpha sweep with 5-fold CV: embedwalk (one statistics pass + analytic CV)
against scikit-learn's ``RidgeCV(alphas, cv=KFold(5))``.

    python benchmarks/bench_ridge.py                 # 200k x 576 -> 64, 10 alphas, 5 folds
    python benchmarks/bench_ridge.py --n 50000 --repeats 2 --sk-repeats 1   # quicker

Every timed run happens in a fresh spawned process that rebuilds the same seeded
data first (not timed), so runs do not share caches and peak memory can be
measured per method: the peak resident set *above* the process's footprint
once the data is in memory (Linux: VmHWM after resetting it via clear_refs).
Both methods see identical folds (contiguous KFold blocks; embedwalk gets them
through ``FoldedStats.update(..., folds=)``) and the float32 inputs an
activation store would hold.  scikit-learn selects one alpha for all targets
by mean fold R²; embedwalk is run in its shared-alpha mode (lowest pooled
held-out MSE).  Coefficients are compared at scikit-learn's chosen alpha, and
once more against a float64 scikit-learn ``Ridge`` fit at that alpha.

Wall and CPU time are both reported: on a shared machine CPU time is the
steadier measure of the work done.  Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(n: int, p: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Activation-like inputs: low-rank structure, uneven scales, a few huge
    dimensions and a large offset; targets linear in them plus uneven noise."""
    rng = np.random.default_rng(seed)
    rank = min(64, p)
    scale = np.exp(rng.normal(size=p) * 0.5)
    scale[rng.choice(p, size=min(4, p), replace=False)] *= 30.0  # "massive activation" dims
    x = np.empty((n, p), dtype=np.float32)
    basis = rng.normal(size=(rank, p)).astype(np.float32)
    offset = (rng.normal(size=p) * 20).astype(np.float32)
    for s in range(0, n, 50_000):  # chunked to keep the float64 temporaries small
        m = min(50_000, n - s)
        z = rng.normal(size=(m, rank)).astype(np.float32) @ basis
        z += rng.normal(size=(m, p)).astype(np.float32)
        x[s : s + m] = z * scale.astype(np.float32) + offset
    coef = (rng.normal(size=(p, q)) / np.sqrt(p) / scale[:, None]).astype(np.float32)
    noise = np.exp(rng.uniform(-1, 1, size=q)).astype(np.float32)
    y = x @ coef + rng.normal(size=(n, q)).astype(np.float32) * noise
    return x, y


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _kfold(n: int, k: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    folds = np.empty(n, dtype=np.int64)
    for f, (_, te) in enumerate(KFold(k).split(np.empty((n, 1)))):
        folds[te] = f
    return folds


def run_embedwalk(cfg: dict, compare_alpha: float | None) -> dict:
    import torch

    from embedwalk.concepts import FoldedStats, fit_ridge

    x, y = make_data(cfg["n"], cfg["p"], cfg["q"], cfg["seed"])
    folds = torch.from_numpy(_kfold(cfg["n"], cfg["folds"]))
    alphas = cfg["alphas"]
    _reset_peak()
    base = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    fs = FoldedStats(cfg["folds"])
    for s in range(0, cfg["n"], cfg["batch"]):
        sl = slice(s, s + cfg["batch"])
        fs.update(torch.from_numpy(x[sl]), torch.from_numpy(y[sl]), folds=folds[sl])
    t_stats = time.perf_counter() - t0
    fit = fit_ridge(fs, alphas, alpha_per_target=False)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM") - base
    t1 = time.perf_counter()
    per_target = fit_ridge(fs, alphas, alpha_per_target=True)
    t_per_target = time.perf_counter() - t1
    out = {"time": elapsed, "cpu": cpu, "stats_time": t_stats, "peak": peak, "alpha": float(fit.alpha[0]),
           "per_target_solve_time": t_per_target,
           "n_distinct_alphas_per_target": len(set(per_target.alpha.tolist()))}
    if compare_alpha is not None:
        at = fit_ridge(fs.total(), compare_alpha)
        out["coef"] = at.coef.numpy()
        out["intercept"] = at.intercept.numpy()
    return out


def run_sklearn(cfg: dict, _unused=None) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    x, y = make_data(cfg["n"], cfg["p"], cfg["q"], cfg["seed"])
    _reset_peak()
    base = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    model = RidgeCV(alphas=cfg["alphas"], cv=KFold(cfg["folds"])).fit(x, y)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM") - base
    return {"time": elapsed, "cpu": cpu, "peak": peak, "alpha": float(model.alpha_),
            "coef": model.coef_.T.astype(np.float64), "intercept": np.asarray(model.intercept_)}


def run_sklearn_f64_reference(cfg: dict, alpha: float) -> dict:
    from sklearn.linear_model import Ridge

    x, y = make_data(cfg["n"], cfg["p"], cfg["q"], cfg["seed"])
    m = Ridge(alpha=alpha).fit(x.astype(np.float64), y.astype(np.float64))
    return {"coef": m.coef_.T, "intercept": m.intercept_}


def _init_child(threads: int | None) -> None:
    # Same thread budget for both libraries: torch's pool and every BLAS pool.
    if threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads)


def _in_child(threads, fn, *args):
    # A fresh interpreter per run: clean memory accounting and no warm caches.
    with mp.get_context("spawn").Pool(1, initializer=_init_child, initargs=(threads,)) as pool:
        return pool.apply(fn, args)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--p", type=int, default=576)
    ap.add_argument("--q", type=int, default=64)
    ap.add_argument("--n-alphas", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of embedwalk")
    ap.add_argument("--sk-repeats", type=int, default=None, help="timed runs of sklearn (default: --repeats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="limit torch and BLAS threads in both methods (default: library defaults)")
    args = ap.parse_args(argv)
    sk_repeats = args.sk_repeats or args.repeats

    # Alphas spanning under- to over-regularised for these data (XᵀX ~ n · var).
    alphas = [float(a) for a in np.logspace(-1, 6, args.n_alphas)]
    cfg = dict(n=args.n, p=args.p, q=args.q, alphas=alphas, folds=args.folds,
               batch=args.batch, seed=args.seed)
    print(f"data: {args.n} x {args.p} float32 -> {args.q} targets; {args.n_alphas} alphas "
          f"{alphas[0]:.3g}..{alphas[-1]:.3g}; {args.folds}-fold CV; {os.cpu_count()} CPUs, "
          f"threads={args.threads or 'default'}")

    sk_runs = []
    for i in range(sk_repeats):
        sk_runs.append(_in_child(args.threads, run_sklearn, cfg))
        print(f"  sklearn run {i + 1}: {sk_runs[-1]['time']:.2f} s", flush=True)
    alpha_sk = sk_runs[0]["alpha"]
    ew_runs = []
    for i in range(args.repeats):
        ew_runs.append(_in_child(args.threads, run_embedwalk, cfg, alpha_sk if i == 0 else None))
        print(f"  embedwalk run {i + 1}: {ew_runs[-1]['time']:.2f} s "
              f"(stats pass {ew_runs[-1]['stats_time']:.2f} s)", flush=True)
    ref = _in_child(args.threads, run_sklearn_f64_reference, cfg, alpha_sk)

    t_sk = statistics.median(r["time"] for r in sk_runs)
    t_ew = statistics.median(r["time"] for r in ew_runs)
    mem_sk = max(r["peak"] for r in sk_runs) / 2**20
    mem_ew = max(r["peak"] for r in ew_runs) / 2**20
    ew0, sk0 = ew_runs[0], sk_runs[0]
    rows = [
        ("median time (s)", f"{t_ew:.2f}", f"{t_sk:.2f}"),
        ("median CPU time (s)", f"{statistics.median(r['cpu'] for r in ew_runs):.2f}",
         f"{statistics.median(r['cpu'] for r in sk_runs):.2f}"),
        ("runs", str(len(ew_runs)), str(len(sk_runs))),
        ("  of which stats pass (s)", f"{statistics.median(r['stats_time'] for r in ew_runs):.2f}", "-"),
        ("peak extra memory (MiB)", f"{mem_ew:.0f}", f"{mem_sk:.0f}"),
        ("chosen alpha (shared)", f"{ew0['alpha']:.4g}", f"{alpha_sk:.4g}"),
        ("coef rel. diff vs float64 Ridge", f"{_rel(ew0['coef'], ref['coef']):.1e}",
         f"{_rel(sk0['coef'], ref['coef']):.1e}"),
    ]
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{w}}  {'embedwalk':>12}  {'sklearn':>12}")
    for name, a, b in rows:
        print(f"{name:{w}}  {a:>12}  {b:>12}")
    print()
    print(f"speed-up (sklearn / embedwalk): {t_sk / t_ew:.1f}x")
    print(f"coef rel. diff embedwalk vs sklearn RidgeCV at alpha={alpha_sk:.4g}: "
          f"{_rel(ew0['coef'], sk0['coef']):.1e}")
    print(f"per-target alpha selection from the same statistics: +{ew0['per_target_solve_time']:.2f} s, "
          f"{ew0['n_distinct_alphas_per_target']} distinct alphas across {args.q} targets")


if __name__ == "__main__":
    main()
