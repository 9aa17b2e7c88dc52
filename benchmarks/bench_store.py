"""Benchmark the activation store: caching vs forward-only throughput, bytes on disk, memory, reads.

    python benchmarks/bench_store.py            # tiny GPT-2 + SmolLM2 (about 3 min on 2 CPU cores)
    python benchmarks/bench_store.py --quick    # tiny model only

Prints medians of several interleaved runs. Goals (issue 5): caching >= 85% of forward-only
tokens/s; on-disk bytes <= 2% beyond rows x (hooks x d_model x dtype + 16 index bytes); peak RSS
growing < 20% when the collection grows 10x (measured in fresh subprocesses with getrusage).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import embedwalk as ew
from embedwalk.store import cache_activations, open_store

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or "
         "city river music science history garden winter market letter mountain window story").split()


def texts_for(model, n: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    if "w5" in ew.adapt(model).tokenizer.get_vocab():  # embedwalk's word-level test models
        return [" ".join(f"w{x}" for x in rng.integers(2, 200, words)) for _ in range(n)]
    return [" ".join(rng.choice(WORDS, words)).capitalize() + "." for _ in range(n)]


class _Nothing(ew.Reader):
    def hook_points(self, adapter):
        return []


def throughput(model, texts, batch_size, hook_sets, repeats):
    a = ew.adapt(model)
    n_tokens = sum(len(a.to_tokens(t)) for t in texts)
    times = {"forward only": []}
    for name, _ in hook_sets:
        times[name] = []
    info = {}
    for _ in range(repeats):  # interleaved so machine load drifts hit every row alike
        t = time.perf_counter()
        ew.run(model, texts, readers=[_Nothing()], batch_size=batch_size, progress=False)
        times["forward only"].append(time.perf_counter() - t)
        for name, kw in hook_sets:
            d = Path(tempfile.mkdtemp(prefix="ewbench-"))
            t = time.perf_counter()
            store = cache_activations(model, texts, d / "s", batch_size=batch_size, progress=False, **kw)
            times[name].append(time.perf_counter() - t)
            on_disk = sum(p.stat().st_size for p in (d / "s").rglob("*") if p.is_file())
            shards = sum(s["bytes"] for s in store.manifest["shards"])
            raw = len(store) * (len(store.hooks) * store.d_model * store.dtype.itemsize + 16)
            info[name] = (len(store), len(store.hooks), raw, shards, on_disk)
            shutil.rmtree(d)
    base = statistics.median(times["forward only"])
    print(f"\n{a.cfg.model_name if hasattr(a.cfg, 'model_name') else ''} {type(model).__name__}: {len(texts)} prompts, {n_tokens} tokens, batch {batch_size}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'run':<34}{'s':>8}{'tok/s':>10}{'vs fwd':>8}{'hooks':>6}{'raw MB':>9}{'shards +%':>10}{'all files +%':>13}")
    for name, ts in times.items():
        m = statistics.median(ts)
        row = f"{name:<34}{m:>8.2f}{n_tokens / m:>10.0f}{base / m:>8.1%}"
        if name in info:
            rows, hooks, raw, shards, total = info[name]
            row += f"{hooks:>6}{raw / 2**20:>9.2f}{(shards - raw) / raw:>10.2%}{(total - raw) / raw:>13.2%}"
        print(row)


def read_speed(model, texts):
    d = Path(tempfile.mkdtemp(prefix="ewbench-"))
    store = cache_activations(model, texts, d / "s", batch_size=8, progress=False, shard_mb=8)
    h = store.hooks[len(store.hooks) // 2]
    from safetensors import safe_open

    def via_mmap():
        s = open_store(d / "s")
        return sum(float(sh.tensors[f"act.{h}"].float().sum()) for sh in s.shards)

    def via_safe_open():
        tot = 0.0
        for sh in store.shards:
            with safe_open(str(sh.path), "pt") as f:
                tot += float(f.get_tensor(f"act.{h}").float().sum())
        return tot

    def via_batches(shuffle):
        s = open_store(d / "s")
        return sum(len(b) for b in s.batches(hooks=[h], batch_size=4096, shuffle=shuffle))

    mb = len(store) * store.d_model * store.dtype.itemsize / 2**20
    print(f"\nreading one hook ({len(store)} rows, {mb:.1f} MB, {len(store.shards)} shards), median of 5, cold page cache not forced")
    for name, fn in [("numpy memmap -> torch (embedwalk)", via_mmap), ("safetensors safe_open(framework='pt')", via_safe_open),
                     ("store.batches(4096)", lambda: via_batches(False)), ("store.batches(4096, shuffle=True)", lambda: via_batches(True))]:
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        m = statistics.median(ts)
        print(f"{name:<40}{m * 1e3:>9.1f} ms{mb / m:>9.0f} MB/s")
    shutil.rmtree(d)


def rss_child(n: int, path: str) -> None:
    from embedwalk.testing import tiny_model

    model = tiny_model("gpt2", d_model=256, layers=4)
    data = Path(path) / f"data-{n}.txt"
    data.write_text("\n".join(texts_for(model, n, 24, seed=1)) + "\n")
    import threading

    def current_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    base, top, done = current_kb(), [0], threading.Event()

    def sample():  # the high-water mark of the caching itself, above the loaded model
        while not done.is_set():
            top[0] = max(top[0], current_kb())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache_activations(model, data, Path(path) / f"s-{n}", batch_size=16, shard_mb=4, progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done.set()
    t.join()
    print(f"{before} {after} {base} {top[0]}")


def rss(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        got = {}
        for k in (n, 10 * n):
            out = subprocess.run([sys.executable, __file__, "--rss-child", str(k), d], capture_output=True, text=True, check=True)
            got[k] = [int(x) / 1024 for x in out.stdout.split()[-4:]]
        print("\npeak RSS, fresh process per size (tiny GPT-2 d_model 256, 4 layers, 4 MB shards, data read from a text file)")
        print(f"{'prompts':>8}{'ru_maxrss MB':>14}{'RSS before MB':>15}{'max RSS while caching MB':>26}{'extra MB':>10}")
        for k, (_, a, base, top) in got.items():
            print(f"{k:>8}{a:>14.0f}{base:>15.0f}{top:>26.0f}{top - base:>10.1f}")
        a1, a2 = got[n][1], got[10 * n][1]
        e1, e2 = got[n][3] - got[n][2], got[10 * n][3] - got[10 * n][2]
        print(f"growth of peak RSS for 10x the prompts: {(a2 - a1) / a1:+.1%} (goal < 20%); extra while caching {e1:.1f} -> {e2:.1f} MB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-child", nargs=2)
    ap.add_argument("--smollm2-only", action="store_true")
    ap.add_argument("--prompts", type=int, default=128, help="prompts of the tiny-model tables")
    ap.add_argument("--no-rss", action="store_true", help="skip the memory-growth table (subprocesses)")
    args = ap.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1])
        return
    os.environ.setdefault("EMBEDWALK_CACHE", "/tmp/ewcache")
    from embedwalk.testing import installed_generation, tiny_model

    tiny = tiny_model("gpt2", d_model=256, layers=4)
    tt = texts_for(tiny, args.prompts, 32)
    if not args.smollm2_only:
        run_tiny(tiny, tt, args)
    if args.quick:
        return
    from embedwalk.models import load_model

    smol = load_model("smollm2", generation=installed_generation(), device="cpu")
    st = texts_for(smol, 32, 24)
    throughput(smol, st, 8, [("cache all 30 layers (bf16)", {}), ("cache resid_post.15+final (bf16)", {"layers": [15]})], args.repeats)


def run_tiny(tiny, tt, args):
    throughput(tiny, tt, 16, [("cache all layers+final (bf16)", {}), ("cache final, last pos (bf16)", {"hooks": ["final"], "positions": "last"})], args.repeats)
    read_speed(tiny, tt * 2)
    if not args.no_rss:
        rss(100)


if __name__ == "__main__":
    main()
