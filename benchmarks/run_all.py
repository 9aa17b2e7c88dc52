"""Run the benchmarks and print every capability's table, one script after another.

    python benchmarks/run_all.py                        # every bench_*.py, full sizes
    python benchmarks/run_all.py logit store            # those whose name contains a word
    python benchmarks/run_all.py --device cuda --quick  # the capability tables in ~5 minutes on a GPU
    python benchmarks/run_all.py --tiny                 # the same tables at toy sizes (the CPU test)

``--quick`` and ``--tiny`` run one table per capability: the logit lens against
TransformerLens's and against the readout GEMMs alone (SmolLM2 and the GPT-2-small shape), the
uniform swap against a plain forward (with the sweep and the downstream memory under
``--quick``), caching throughput against a forward, and the concept fitter's rows/s.
``--device`` goes to the scripts that take one (logit lens, swap); the store and fitter
tables run on the CPU. Benchmarks print side-by-side tables (medians of runs in turns, ratios
to the anchor, peak memory) and never assert a time. Record figures in the README with the
machine they came from.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent

# the naive materialised lens (~10 GB of logits) is left to the full run
QUICK_LENS = "forward,gemm,embedwalk,embedwalk_fused,tl_logit_lens"

# capability -> (script, arguments under --quick, arguments under --tiny, takes --device)
PLAN = {
    "logit lens (SmolLM2)": ("bench_logit_lens.py", ["--model", "smollm2", "--runs", "2", "--methods", QUICK_LENS], None, True),
    "logit lens (GPT-2-small shape)": (
        "bench_logit_lens.py", ["--model", "gpt2-small-shape", "--runs", "2", "--methods", QUICK_LENS],
        ["--model", "tiny", "--runs", "1", "--batch", "1", "--seq", "8", "--methods", "forward,gemm,embedwalk"],
        True,
    ),
    "uniform swap vs forward": (
        "bench_association.py", ["--quick"], ["--quick", "--no-smollm2", "--no-sweep", "--tiny-model", "--pos", "8", "--repeats", "1"], True,
    ),
    "caching vs forward": ("bench_store.py", ["--quick"], ["--quick", "--repeats", "1", "--no-rss", "--prompts", "8"], False),
    "concept fitter rows/s": (
        "bench_concept_fitter.py", ["--prompts", "64", "--repeats", "2"],
        ["--prompts", "4", "--tokens", "8", "--d-model", "32", "--repeats", "1"], False,
    ),
}


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return f"{where} | torch {torch.__version__} | python {platform.python_version()}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", help="only scripts / capabilities whose name contains one of these")
    p.add_argument("--device", default=None, help="cuda or cpu, for the scripts that take a device")
    p.add_argument("--quick", action="store_true", help="one table per capability, quick sizes")
    p.add_argument("--tiny", action="store_true", help="one table per capability at toy sizes (tests)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine(device)}", flush=True)
    if args.quick or args.tiny:
        jobs = []
        for name, (script, quick, tiny, takes_device) in PLAN.items():
            extra = tiny if args.tiny else quick
            if extra is None or (args.words and not any(w in name or w in script for w in args.words)):
                continue
            jobs.append((name, script, extra + (["--device", device] if takes_device else [])))
    else:
        scripts = sorted(q.name for q in HERE.glob("bench_*.py") if not args.words or any(w in q.stem for w in args.words))
        jobs = [(s, s, ["--device", device] if PLAN_DEVICE.get(s) else []) for s in scripts]
    failed = []
    t0 = time.perf_counter()
    for name, script, extra in jobs:
        print(f"\n===== {name}: {script} {' '.join(extra)} =====", flush=True)
        if subprocess.call([sys.executable, str(HERE / script), *extra]) != 0:
            failed.append(name)
    print(f"\nall tables in {time.perf_counter() - t0:.0f} s on {machine(device)}")
    if failed:
        print(f"benchmarks that failed: {failed}")
    return 1 if failed else 0


PLAN_DEVICE = {script: takes for script, _, _, takes in PLAN.values()} | {"bench_walk_lens.py": True}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
