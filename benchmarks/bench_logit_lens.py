"""Logit lens: embedwalk (all readouts, all positions, every metric) vs TransformerLens 4.3's
``tools.analysis.logit_lens`` (next-token targets alone) vs the naive materialised lens, and
vs the floor: the readout GEMMs alone (every readout x every position through the
unembedding, in chunks of 1024 rows, nothing else).

Each method runs in its own subprocess so peak memory is its own: on CPU the growth of the
process's max RSS over a warmed-up plain forward pass (tracemalloc cannot see torch's CPU
allocations), on CUDA ``torch.cuda.max_memory_allocated`` over the same baseline. The
subprocesses run in turns, ``--runs`` rounds of every method (one warm-up and one timed run
each), so drift on a shared machine hits every method alike; times are the median over
rounds. Nothing is asserted.

    python benchmarks/bench_logit_lens.py --model gpt2-small-shape --runs 3
    python benchmarks/bench_logit_lens.py --model smollm2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ["forward", "gemm", "embedwalk", "embedwalk_fused", "tl_logit_lens", "naive"]


def build(model_name: str, generation: str, device: str):
    from embedwalk.models import load_model, wrap
    from embedwalk.testing import installed_generation, tiny_tokenizer

    generation = generation or installed_generation()
    if model_name == "smollm2":
        return load_model("smollm2", generation=generation, device=device)
    if model_name == "tiny":  # toy size, for the test of the benchmark scripts
        from embedwalk.testing import tiny_model

        return tiny_model("gpt2", generation).to(device)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    return wrap(hf, tiny_tokenizer(), generation=generation, device=device, name="gpt2-small-shape")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> None:
    import embedwalk as ew
    from embedwalk.lenses import logit_lens

    torch.set_num_threads(args.threads)
    model = build(args.model, args.generation, args.device)
    a = ew.adapt(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, a.d_vocab, (args.batch, args.seq), generator=g).to(a.device)
    targets = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
    cuda = a.device.type == "cuda"
    if args.worker == "gemm":
        n_rows = len(a.readout_points()) * args.batch * args.seq
        x_rows = torch.randn(n_rows, a.d_model, generator=g).to(device=a.device, dtype=a.dtype)
        W_U = a.W_U.detach().contiguous()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def method():
        if args.worker == "forward":
            with torch.no_grad():
                model(tokens)
        elif args.worker in ("embedwalk", "embedwalk_fused"):
            fused = True if args.worker == "embedwalk_fused" else None
            logit_lens(model, tokens, top_k=5, chunk_size=args.chunk_size, batch_size=args.batch, progress=False, fused=fused)
        elif args.worker == "tl_logit_lens":
            from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

            with torch.no_grad():
                tl_logit_lens(model, tokens, positions=None, targets=targets)
        elif args.worker == "naive":
            naive(model, a, tokens, targets)
        elif args.worker == "gemm":
            gemm_floor(x_rows, W_U)

    with torch.no_grad():
        model(tokens)  # baseline: a warmed-up plain forward pass
    sync()
    base = torch.cuda.max_memory_allocated() if cuda else rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(args.runs + 1):
        sync()
        t0 = time.perf_counter()
        method()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mb() - base
    print(json.dumps({"method": args.worker, "median_s": statistics.median(times[1:]), "all_s": times[1:],
                      "first_s": times[0], "peak_extra_mb": peak}))


@torch.no_grad()
def gemm_floor(x_rows, W_U, chunk=1024):
    """The arithmetic no logit lens can avoid: every (readout, position) row times W_U."""
    for i in range(0, x_rows.shape[0], chunk):
        x_rows[i : i + chunk] @ W_U


@torch.no_grad()
def naive(model, a, tokens, targets):
    """Stack every readout, final norm, unembed, then every metric over the full tensor."""
    points = a.readout_points()
    _, cache = model.run_with_cache(tokens, names_filter=[p.hook for p in points])
    stack = torch.stack([cache[p.hook] for p in points])  # [R, B, T, d]
    lp = a.readout(stack).float().log_softmax(-1)  # [R, B, T, V]
    final = lp[-1]
    kl = (final.exp() * (final - lp)).sum(-1)
    ent = -(lp.exp() * lp).sum(-1)
    top = lp.topk(5, -1)
    tgt = lp.gather(-1, targets[None, ..., None].expand(len(points), -1, -1, 1))
    rank = (lp > tgt).sum(-1)
    return kl, ent, top, tgt, rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small-shape", choices=["gpt2-small-shape", "smollm2", "tiny"])
    p.add_argument("--generation", default=None, help="bridge or hooked (default: the installed TransformerLens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    methods = args.methods.split(",")
    runs: dict[str, list] = {m: [] for m in methods}
    for _ in range(args.runs):
        for m in methods:
            cmd = [sys.executable, __file__, "--worker", m, "--runs=1"] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("worker", "methods", "runs") and v is not None
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(f"{m}: failed\n{out.stderr[-1500:]}", file=sys.stderr)
                continue
            runs[m].append(json.loads(lines[-1]))
    rows = {m: {"median_s": statistics.median(r["median_s"] for r in rs), "peak_extra_mb": max(r["peak_extra_mb"] for r in rs),
                "first_s": max(r["first_s"] for r in rs)}
            for m, rs in runs.items() if rs}
    floor = rows.get("gemm", {}).get("median_s")
    tl = rows.get("tl_logit_lens", {}).get("median_s")
    print(f"\nlogit lens, {args.model}, {args.batch} x {args.seq} tokens, device {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}, median of {args.runs} rounds in turns "
          "(gemm: the readout GEMMs alone; embedwalk_fused: fused=True, whose first call in a process "
          "includes compiling the kernel)")
    print(f"{'method':<16}{'time (s)':>10}{'TL / this':>11}{'x GEMM floor':>14}{'peak extra (MB)':>17}{'first call (s)':>16}")
    for m, r in rows.items():
        ratio = f"{tl / r['median_s']:.2f}x" if tl else "-"
        over = f"{r['median_s'] / floor:.2f}x" if floor else "-"
        print(f"{m:<16}{r['median_s']:>10.3f}{ratio:>11}{over:>14}{r['peak_extra_mb']:>17.0f}{r['first_s']:>16.2f}")


if __name__ == "__main__":
    main()
