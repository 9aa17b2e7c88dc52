#!/usr/bin/env bash
# One command on a fresh machine: set up .venv and run the demo on SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/embedwalk demo "$@"
