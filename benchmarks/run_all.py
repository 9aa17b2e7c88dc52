"""Run every benchmark script in this folder, one after another, and print their tables.

    python benchmarks/run_all.py              # all of them
    python benchmarks/run_all.py logit store  # those whose name contains a word

Benchmarks print side-by-side tables (median of several runs, ratio to the anchor, peak
memory) and never assert a time. Record figures in the README with the machine they came from.
"""

import platform
import subprocess
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    scripts = sorted(p for p in here.glob("bench_*.py") if not argv or any(w in p.stem for w in argv))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"machine: {platform.machine()} {platform.processor() or ''} | {device} | torch {torch.__version__}")
    failed = []
    for script in scripts:
        print(f"\n===== {script.name} =====", flush=True)
        if subprocess.call([sys.executable, str(script)]) != 0:
            failed.append(script.name)
    if failed:
        print(f"\nbenchmarks that failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
