"""Benchmark: building token-priority graphs, embedwalk vs a straightforward networkx version.

Random data: N samples of length T over a V-token vocabulary, each label a random token
of its sequence.  Both sides build every G(k), find the SCCs and the condensation DAG
(the priority order).  networkx is run on a subsample (it is far too slow and memory
hungry for the full size) and its time and memory are extrapolated linearly in the
number of samples — stated in the table.  Times are medians of several runs; nothing is
asserted.

    python benchmarks/bench_priority.py            # 1,000,000 x 16 over 50,000 tokens
    python benchmarks/bench_priority.py --samples 100000 --nx-samples 20000
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import tracemalloc

import networkx as nx
import numpy as np

from embedwalk.priority import build_priority_graphs


def networkx_graphs(seqs: np.ndarray, labels: np.ndarray) -> dict:
    """The obvious implementation: one DiGraph per last token, then SCCs and condensation."""
    graphs: dict[int, nx.DiGraph] = {}
    for X, y in zip(seqs.tolist(), labels.tolist()):
        G = graphs.get(X[-1])
        if G is None:
            G = graphs[X[-1]] = nx.DiGraph()
        G.add_node(y)
        G.add_edges_from((y, j) for j in X if j != y)
        G.add_nodes_from(X)
    return {k: nx.condensation(G) for k, G in graphs.items()}  # SCCs + DAG between them


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds (CPU time is the steadier figure on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def peak_mib(fn) -> float:
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--nx-samples", type=int, default=50_000, help="networkx subsample size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    rng = np.random.default_rng(a.seed)
    seqs = rng.integers(0, a.vocab, size=(a.samples, a.length))
    labels = seqs[np.arange(a.samples), rng.integers(0, a.length, size=a.samples)]
    sub = slice(0, min(a.nx_samples, a.samples))

    ew = lambda: build_priority_graphs(seqs, labels, vocab_size=a.vocab)
    nxf = lambda: networkx_graphs(seqs[sub], labels[sub])
    result = ew()
    t_ew, t_nx = timed(ew, a.repeats), timed(nxf, a.repeats)
    m_ew, m_nx = peak_mib(ew), peak_mib(nxf)
    scale = a.samples / (sub.stop - sub.start)

    print(f"{a.repeats} runs each; machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"data: {a.samples:,} samples x {a.length} tokens, vocab {a.vocab:,}; {result}")
    print(f"networkx measured on {sub.stop:,} samples; full-size figures extrapolated x{scale:g} (linear)")
    rows = [
        ("wall time, median (s)", t_ew[0], t_nx[0] * scale, t_nx[0]),
        ("CPU time, median (s)", t_ew[1], t_nx[1] * scale, t_nx[1]),
        ("peak traced memory (MiB)", m_ew, m_nx * scale, m_nx),
    ]
    print(f"\n{'':26s} {'embedwalk':>12s} {'networkx (extrap.)':>20s} {'networkx (measured)':>20s} {'ratio':>8s}")
    for name, e, n_full, n_meas in rows:
        print(f"{name:26s} {e:12.2f} {n_full:20.1f} {n_meas:20.2f} {n_full / e:7.1f}x")


if __name__ == "__main__":
    main()
