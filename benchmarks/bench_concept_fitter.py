"""Throughput of the concept fitter reading from an activation store.

    python benchmarks/bench_concept_fitter.py                       # 256 prompts x 64 tokens, d=576
    python benchmarks/bench_concept_fitter.py --prompts 64 --repeats 2   # quicker

Builds a store once (a 2-layer random Llama-style model with SmolLM2's width, d_model 576,
every token stored in float32; building it is not timed), then times, over the same rows:

* raw read: ``store.batches`` with every vector touched (a float32 sum), the anchor;
* fit (label): ``fit_from_store`` of x = resid_post.1 on a 1-column metadata target;
* fit (vector): ``fit_from_store`` of x = resid_post.1 on y = resid_post.0 (576 targets).

Reported: median rows/s of the streaming pass over several runs, the ratio to the raw read rate, and the peak extra
resident memory of each run (Linux VmHWM after reset, above the process's footprint). The
statistics are float64 Chan updates, so a wide target costs ~3 matrix products of
[batch, 576] per batch: "limited by reading" is the ratio near 1. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(fn, repeats: int):
    """``fn() -> (rows, seconds of the streaming pass)``; also the whole call's time."""
    passes, totals, peaks = [], [], []
    for _ in range(repeats):
        _reset_peak()
        base = _rss_kb("VmRSS:")
        t0 = time.perf_counter()
        rows, secs = fn()
        totals.append(time.perf_counter() - t0)
        passes.append(secs if secs is not None else totals[-1])
        peaks.append(max(_rss_kb("VmHWM:") - base, 0) / 1024)
    return rows, statistics.median(passes), statistics.median(totals), max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from embedwalk.concepts.experiments import fit_from_store
    from embedwalk.store import cache_activations, open_store
    from embedwalk.testing import tiny_model

    tmp = tempfile.mkdtemp(prefix="bench-concepts-")
    model = tiny_model("llama", d_model=args.d_model, layers=2)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(2, 199, size=args.tokens - 1)) for _ in range(args.prompts)]
    meta = [{"label": float(rng.normal())} for _ in range(args.prompts)]
    cache_activations(model, texts, tmp, layers=[0, 1], positions="all", dtype="float32",
                      metadata=meta, progress=False)
    store = open_store(tmp)
    x = "blocks.1.hook_resid_post"

    def raw():
        n = 0
        acc = torch.zeros((), dtype=torch.float32)
        for b in store.batches([x, "blocks.0.hook_resid_post"], batch_size=args.batch_size):
            acc += b.vectors[x].sum() + b.vectors["blocks.0.hook_resid_post"].sum()
            n += len(b)
        return n, None

    def fit_label():
        info = fit_from_store(store, x, "meta:label", batch_size=args.batch_size)[1]
        return info["rows"], info["seconds_pass"]

    def fit_vector():
        info = fit_from_store(store, x, "resid_post.0", batch_size=args.batch_size)[1]
        return info["rows"], info["seconds_pass"]

    rows = []
    for name, fn in [("raw read (x and y hooks)", raw), ("fit x -> meta label (q=1)", fit_label),
                     ("fit x -> resid_post.0 (q=576)", fit_vector)]:
        fn()  # warm the page cache and code paths
        n, t, total, peak = measure(fn, args.repeats)
        rows.append((name, n, t, n / t, total - t, peak))
    anchor = rows[0][3]
    print(f"store: {len(store)} rows x d_model {store.d_model} float32, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print("pass = streaming the rows into per-fold statistics; solve = CV alpha sweep after the pass")
    print(f"{'what':32s} {'rows':>8s} {'pass s':>9s} {'rows/s':>11s} {'vs raw read':>12s} {'solve s':>8s} {'peak extra MB':>14s}")
    for name, n, t, rate, solve, peak in rows:
        print(f"{name:32s} {n:8d} {t:9.3f} {rate:11.0f} {rate / anchor:12.3f} {solve:8.2f} {peak:14.1f}")


if __name__ == "__main__":
    os.environ.setdefault("EMBEDWALK_CACHE", str(Path(tempfile.gettempdir()) / "ewcache"))
    main()
