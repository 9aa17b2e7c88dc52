"""Forward pass with every head swapped for uniform aggregation: fast path vs pattern replacement
vs the plain forward (the anchor). Prints a table; asserts nothing.

    python benchmarks/bench_association.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
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


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_extra(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return float("nan")  # torch keeps no peak statistic for CPU memory; measured on CUDA only


def bench(name, model, tokens, repeats, device):
    tokens = tokens.to(device)

    def plain():
        with torch.no_grad():
            model(tokens)

    def swapped(method):
        return lambda: ew.run(model, tokens, writers=[UniformSwap(method=method)], progress=False, batch_size=len(tokens))

    rows = []
    base = None
    for label, fn in (("plain forward (anchor)", plain), ("swap: fast path (hook_z)", swapped("fast")),
                      ("swap: pattern replacement", swapped("pattern"))):
        t = timed(fn, repeats)
        base = base or t
        rows.append((name, label, t * 1000, t / base, peak_extra(fn, device)))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--generation", default=None)
    p.add_argument("--no-smollm2", action="store_true")
    args = p.parse_args()
    from embedwalk.testing import installed_generation

    gen = args.generation or installed_generation()
    repeats = 3 if args.quick else 7
    batch, pos = (4, 128)
    rows = []
    if not args.no_smollm2:
        sm = ew.load_model("smollm2", generation=gen, device=args.device)
        rows += bench(f"SmolLM2-135M {batch}x{pos}", sm, torch.randint(2, 49152, (batch, pos)), repeats, args.device)
        del sm
    g2 = gpt2_small_random(gen, args.device)
    rows += bench(f"GPT-2-small random {batch}x{pos}", g2, torch.randint(2, 50257, (batch, pos)), repeats, args.device)
    print(f"\ndevice {args.device}, TL generation {gen}, torch threads {torch.get_num_threads()}, median of {repeats}")
    print(f"{'model':<28} {'method':<28} {'ms':>9} {'x anchor':>9} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r[0]:<28} {r[1]:<28} {r[2]:9.1f} {r[3]:9.2f} {r[4]:15.1f}")


if __name__ == "__main__":
    main()
