#!/usr/bin/env bash
# One command on a fresh machine: set up both TransformerLens generations and run the tests.
#   .venv      newest transformer-lens 4.x  (TransformerBridge fixtures, SmolLM2, tutorials)
#   .venv-tl3  transformer-lens 3.9         (HookedTransformer fixtures, SmolLM2)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 EMBEDWALK_CACHE=${EMBEDWALK_CACHE:-$PWD/.cache/embedwalk}
bash scripts/setup.sh .venv || exit 1
bash scripts/setup.sh .venv-tl3 "transformer-lens==3.9.0" || exit 1

status=0
echo "=== tests on transformer-lens 4.x (TransformerBridge) ==="
.venv/bin/python -m pytest "$@" || status=1
echo "=== tests on transformer-lens 3.9 (HookedTransformer) ==="
.venv-tl3/bin/python -m pytest "$@" || status=1
exit $status
