"""Forward pass with every head swapped for uniform aggregation: fast path vs pattern replacement
vs the plain forward (the anchor). Prints a table; asserts nothing.

Rows: the plain forward; the fast path (every layer bypassed: values, running mean, output
projection, no query-key path); the fast path's hook fallback (what a layer runs when it cannot
be bypassed: the model computes its own pattern and ``hook_z`` is overwritten); the pattern
replacement. Methods are timed in turns, repeat by repeat, so drift hits them alike. Peak extra
memory is CUDA's allocator peak on GPU and the resident-set peak (sampled every millisecond,
above the level before the call) on CPU.

Then the sweep (``sweep(units=("all", "layer", "head"))`` on three short texts): one forward
per swapped unit (the way it ran before work was reused) vs the sweep as it runs now (each
swap resumed at its layer from the original pass's residual, the head swaps of a layer as row
groups of one forward), timed in turns. And the peak extra memory of ``downstream`` at two
numbers of prompts: metrics are reduced per batch, so it must not grow with the tokens.

    python benchmarks/bench_association.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

import embedwalk as ew
from embedwalk.association import UniformSwap


def gpt2_small_random(generation, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    from embedwalk.models import wrap
    from embedwalk.testing import tiny_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    return wrap(hf, tiny_tokenizer(), generation=generation, device=device, name="gpt2-small-random")


class HookFallbackSwap(UniformSwap):
    """The fast path as a layer runs it when it cannot be bypassed (every hook point watched)."""

    def bypasses(self, adapter, *, watched, taken, ctx):
        return super().bypasses(adapter, watched=frozenset(adapter.model.hook_dict.values()), taken=taken, ctx=ctx)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_extra(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_mib()) - base


def bench(name, model, tokens, repeats, device):
    tokens = tokens.to(device)

    def plain():
        with torch.no_grad():
            model(tokens)

    def swapped(swap):
        return lambda: ew.run(model, tokens, writers=[swap], progress=False, batch_size=len(tokens))

    methods = {
        "plain forward (anchor)": plain,
        "swap: fast path (bypass)": swapped(UniformSwap(method="fast")),
        "swap: fast, hook fallback": swapped(HookFallbackSwap(method="fast")),
        "swap: pattern replacement": swapped(UniformSwap(method="pattern")),
    }
    for fn in methods.values():  # warm-up: one-time allocations and lazy imports
        fn()
    peaks = {label: peak_extra(fn, device) for label, fn in methods.items()}
    times: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(repeats):
        for label, fn in methods.items():
            times[label].append(timed(fn))
    base = statistics.median(times["plain forward (anchor)"])
    return [(name, label, statistics.median(t) * 1000, statistics.median(t) / base, peaks[label])
            for label, t in times.items()]


TEXTS = ["The quick brown fox jumps over the lazy dog because it was bored.",
         "Paris is the capital of France, and Rome is the capital of",
         "Once upon a time there was a little girl who lived in a village near the forest."]


def one_forward_per_unit(model, texts):
    """The sweep without reuse (one full forward per swapped unit), timed on a sample of units
    and extrapolated to all of them: the full run takes ~20 minutes on SmolLM2 on 2 CPU cores.
    Returns seconds: the original pass + the "all" swap + n_layers x the mean layer swap +
    n_layers x n_heads x the mean head swap."""
    from embedwalk.association.measure import _prepare, _reference, _Sums, _swapped_pass

    adapter, tokens, mask = _prepare(model, texts, None, None, None)
    L, H = adapter.n_layers, adapter.n_heads
    t_ref = timed(lambda: _reference(adapter, tokens, mask))
    ref = _reference(adapter, tokens, mask)

    def unit(targets):
        return timed(lambda: _swapped_pass(adapter, tokens, mask, [UniformSwap(targets)], [ref], [_Sums()]))

    sample = sorted({0, L // 2, L - 1})
    t_layer = statistics.mean(unit([l]) for l in sample)
    t_head = statistics.mean(unit([(l, l % H)]) for l in sample)
    return t_ref + unit("all") + L * t_layer + L * H * t_head


def bench_sweep(name, model, repeats):
    from embedwalk.association import sweep

    times: dict[str, list[float]] = {"one forward per unit (anchor, extrapolated)": [], "sweep (reuse + row groups)": []}
    for _ in range(repeats):  # in turns, so drift hits both alike
        times["one forward per unit (anchor, extrapolated)"].append(one_forward_per_unit(model, TEXTS))
        times["sweep (reuse + row groups)"].append(timed(lambda: sweep(model, TEXTS, progress=False)))
    base = statistics.median(times["one forward per unit (anchor, extrapolated)"])
    return [(name, label, statistics.median(t), base / statistics.median(t)) for label, t in times.items()]


def bench_downstream_memory(name, model, vocab, device, sizes, pos=64):
    from embedwalk.association import downstream

    rows = []
    for n in sizes:
        tokens = torch.randint(2, vocab, (n, pos), generator=torch.Generator().manual_seed(n)).to(device)
        downstream(model, tokens[:2], [0])  # warm-up
        rows.append((name, n * pos, peak_extra(lambda: downstream(model, tokens, [0]), device)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--generation", default=None)
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep and downstream-memory tables")
    p.add_argument("--tiny-model", action="store_true", help="a tiny random GPT-2 instead of GPT-2-small (tests)")
    p.add_argument("--pos", type=int, default=128, help="tokens per prompt of the swap table")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, 3 with --quick)")
    args = p.parse_args()
    from embedwalk.testing import installed_generation

    gen = args.generation or installed_generation()
    repeats = args.repeats or (3 if args.quick else 7)
    batch, pos = 4, args.pos
    rows, sweeps, memory = [], [], []
    if not args.no_smollm2:
        sm = ew.load_model("smollm2", generation=gen, device=args.device)
        rows += bench(f"SmolLM2-135M {batch}x{pos}", sm, torch.randint(2, 49152, (batch, pos)), repeats, args.device)
        if not args.no_sweep:
            sweeps += bench_sweep("SmolLM2-135M, 3 texts", sm, 1 if args.quick else 3)
            memory += bench_downstream_memory("SmolLM2-135M", sm, 49152, args.device, (8, 32) if args.quick else (8, 32, 64))
        del sm
    if args.tiny_model:
        from embedwalk.testing import tiny_model

        g2 = tiny_model("gpt2", gen).to(args.device)
        rows += bench(f"tiny GPT-2 {batch}x{pos}", g2, torch.randint(2, ew.adapt(g2).d_vocab, (batch, pos)), repeats, args.device)
    else:
        g2 = gpt2_small_random(gen, args.device)
        rows += bench(f"GPT-2-small random {batch}x{pos}", g2, torch.randint(2, 50257, (batch, pos)), repeats, args.device)
    print(f"\ndevice {args.device}, TL generation {gen}, torch threads {torch.get_num_threads()}, median of {repeats}")
    print(f"{'model':<28} {'method':<28} {'ms':>9} {'x anchor':>9} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r[0]:<28} {r[1]:<28} {r[2]:9.1f} {r[3]:9.2f} {r[4]:15.1f}")
    if sweeps:
        print("\nsweep(units=('all', 'layer', 'head')), timed in turns")
        print(f"{'model':<28} {'method':<44} {'s':>8} {'speed-up':>9}")
        for r in sweeps:
            print(f"{r[0]:<28} {r[1]:<44} {r[2]:8.2f} {r[3]:8.2f}x")
    if memory:
        print("\ndownstream(targets=[0]), batch_size 8: peak extra memory against the number of tokens")
        print(f"{'model':<28} {'tokens':>8} {'peak extra MiB':>15}")
        for r in memory:
            print(f"{r[0]:<28} {r[1]:>8} {r[2]:15.1f}")


if __name__ == "__main__":
    main()
