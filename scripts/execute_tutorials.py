"""Execute the tutorials in place so they are committed with their outputs (figures, tables).

    python scripts/execute_tutorials.py [tutorials/01_quickstart.ipynb ...]

A reader then sees every figure without running anything. Progress bars are switched off
while executing (``TQDM_DISABLE=1``) so the saved notebooks hold results, not bar redraws;
embedded images are PNGs at 100 dpi to keep each notebook small. The tutorial test executes
the notebooks in memory and neither needs nor rewrites these outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


NOISE = ("TqdmWarning", "Converting and de-quantizing", "Loading weights")


def strip_noise(nb) -> None:
    """Drop stderr streams that are environment noise (library warnings, loading bars)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not (
                o.get("output_type") == "stream" and o.get("name") == "stderr" and any(n in "".join(o.get("text", "")) for n in NOISE))]


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    from datetime import datetime

    strip_noise(nb)
    for cell in nb.cells:  # run-specific noise out of the committed file; long cells reported
        ex = cell.get("metadata", {}).pop("execution", None)
        if ex and "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            secs = (datetime.fromisoformat(ex["shell.execute_reply"].rstrip("Z")) - datetime.fromisoformat(ex["iopub.execute_input"].rstrip("Z"))).total_seconds()
            if secs > 10:
                first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
                print(f"  {path.name}: {secs:6.1f} s  {first[:90]}", flush=True)
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    paths = [Path(p) for p in argv] or sorted((ROOT / "tutorials").glob("*.ipynb"))
    for path in paths:
        secs = execute(path)
        print(f"{path.name}: {secs:.0f} s, {path.stat().st_size / 1024:.0f} KB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
