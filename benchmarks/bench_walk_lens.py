"""Cost of the walk and decomposition lenses relative to a plain forward pass.

    python benchmarks/bench_walk_lens.py [--models smollm2,gpt2-small] [--repeats 5] [--all-positions]

Same input for every row: random token ids, 4 x 128 for the forward pass and the walk lens,
1 x 128 for the decomposition (it reads one prompt). Times are medians of ``--repeats`` runs
after a warm-up; peak extra memory is the peak above the pre-call level: CUDA's allocator
statistics on a GPU, the process's resident set sampled every millisecond on a CPU.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from embedwalk.adapter import adapt
from embedwalk.lenses.decompose import decompose
from embedwalk.lenses.walk import walk_lens
from embedwalk.models import default_device, load_model, wrap
from embedwalk.testing import installed_generation, tiny_tokenizer

PAGE = 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak bytes above the level at entry (CUDA allocator, or sampled RSS on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.stop = False
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.extra = max(0, self.peak - self.base)


def measure(fn, device: str, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    times, extras = [], []
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        extras.append(mem.extra)
    return statistics.median(times), max(extras)


def gpt2_small(device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    return wrap(hf, tiny_tokenizer(), generation=installed_generation(), device=device, name="gpt2-small-random")


class _Rows(list):
    """Rows, echoed as they come so a long CPU run shows progress."""

    def append(self, row):
        super().append(row)
        print(f"  {row[0]}: {row[1]}: {row[2] * 1000:.0f} ms (x{row[3]:.2f}), +{row[4] / 2**20:.0f} MB", flush=True)


def bench(name: str, model, device: str, repeats: int, all_positions: bool) -> list[tuple]:
    a = adapt(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, min(a.d_vocab, 50000), (4, 128), generator=gen)
    one = tokens[:1]

    def forward(t):
        with torch.no_grad():
            model(t.to(device))

    rows = _Rows()
    base, base_mem = measure(lambda: forward(tokens), device, repeats)
    rows.append((name, "plain forward, 4x128", base, 1.0, base_mem))
    t, m = measure(lambda: walk_lens(model, tokens), device, repeats)
    rows.append((name, "walk_lens, last positions (4)", t, t / base, m))
    if all_positions:
        t, m = measure(lambda: walk_lens(model, tokens, positions=None), device, max(1, repeats // 2))
        rows.append((name, "walk_lens, all 512 positions", t, t / base, m))
    base1, m1 = measure(lambda: forward(one), device, repeats)
    rows.append((name, "plain forward, 1x128", base1, 1.0, m1))
    t, m = measure(lambda: decompose(model, one, token=5, by_source=False), device, repeats)
    rows.append((name, "decompose, heads (1x128)", t, t / base1, m))
    t, m = measure(lambda: decompose(model, one, token=5), device, repeats)
    rows.append((name, "decompose, heads x sources", t, t / base1, m))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gpt2-small")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=default_device())
    p.add_argument("--all-positions", action="store_true", help="also time the walk of every position (slow on CPU)")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model = gpt2_small(args.device) if name == "gpt2-small" else load_model(name, generation=installed_generation(), device=args.device)
        rows += bench(name, model, args.device, args.repeats, args.all_positions)
        del model
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{dev}; torch {torch.__version__}; TransformerLens generation {installed_generation()}; median of {args.repeats}\n")
    print("| model | what | time | × forward | peak extra memory |\n|---|---|---|---|---|")
    for model_name, what, t, ratio, mem in rows:
        print(f"| {model_name} | {what} | {t * 1000:.0f} ms | {ratio:.2f} | {mem / 2**20:.0f} MB |")


if __name__ == "__main__":
    main()
