"""scripts/setup.sh on a fresh machine prints no alarming warning (issue 22 item 12).

The script runs against a stand-in ``python3`` that records what pip installs and, like real
torch, prints ``UserWarning: Failed to initialize NumPy`` when torch is imported while numpy
is missing; nothing is downloaded."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A python that knows only what scripts/setup.sh asks of it; installed packages are files in $FAKE_SITE.
site=${FAKE_SITE:?}
if [ "$1" = -m ] && [ "$2" = venv ]; then
  dir=${@: -1}; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"; exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
  shift 3
  for arg in "$@"; do
    case "$arg" in
      torch*) touch "$site/torch" ;;
      numpy*) touch "$site/numpy" ;;
      -e) ;;
      .\[*) touch "$site/numpy" "$site/embedwalk" ;;  # the project's own dependencies include numpy
    esac
    echo "pip install $arg" >> "$site/log"
  done
  exit 0
fi
if [ "$1" = -c ]; then
  case "$2" in
    "import numpy"*) [ -e "$site/numpy" ]; exit $? ;;
    "import torch"*)
      [ -e "$site/torch" ] || { echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; }
      [ -e "$site/numpy" ] || echo "UserWarning: Failed to initialize NumPy: No module named 'numpy'" >&2
      exit 0 ;;
    *) echo "embedwalk 0 | transformer-lens 4 | torch 2"; exit 0 ;;
  esac
fi
echo "fake python: unexpected arguments $*" >&2; exit 3
"""


def _setup(tmp_path, with_gpu: bool):
    site = tmp_path / "site"
    site.mkdir()
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if with_gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_SITE": str(site), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    if not with_gpu:  # hide a real nvidia-smi so the CPU branch runs
        env["PATH"] = ":".join([str(bin_dir)] + [p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists()])
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), str(tmp_path / "venv")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return out, (site / "log").read_text().split("\n")


def test_setup_installs_numpy_before_torch_so_no_numpy_warning_appears(tmp_path):
    for with_gpu in (False, True):
        machine = tmp_path / ("gpu" if with_gpu else "cpu")
        machine.mkdir()
        out, log = _setup(machine, with_gpu)
        assert out.returncode == 0, out.stderr
        assert "Failed to initialize NumPy" not in out.stdout + out.stderr
        first_torch = next(i for i, line in enumerate(log) if line.startswith("pip install torch"))
        assert any(line.startswith("pip install numpy") for line in log[:first_torch + 1]), log


def test_the_test_script_hides_no_setup_warning():
    # scripts/test.sh used to grep the numpy warning out of the setup logs; with numpy
    # installed first there is nothing to hide, and a new warning must show.
    assert "Failed to initialize NumPy" not in (ROOT / "scripts" / "test.sh").read_text()
