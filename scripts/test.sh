#!/usr/bin/env bash
# One command on a fresh machine: set up both TransformerLens generations and run the tests.
#   .venv      newest transformer-lens 4.x  (TransformerBridge fixtures, SmolLM2, tutorials)
#   .venv-tl3  transformer-lens 3.9         (HookedTransformer fixtures, SmolLM2)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 EMBEDWALK_CACHE=${EMBEDWALK_CACHE:-$PWD/.cache/embedwalk}
# The two environments are independent: build them side by side.
mkdir -p .cache
bash scripts/setup.sh .venv > .cache/setup-tl4.log 2>&1 &
tl4=$!
bash scripts/setup.sh .venv-tl3 "transformer-lens==3.9.0" > .cache/setup-tl3.log 2>&1 &
tl3=$!
ok=0
wait $tl4 || ok=1
wait $tl3 || ok=1
cat .cache/setup-tl4.log .cache/setup-tl3.log | grep -v -E "Failed to initialize NumPy|_conversion_method_template"
[ $ok -eq 0 ] || { echo "setup failed" >&2; exit 1; }

# Both generations at once, one thread each (two cores); each log is printed when done.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 EMBEDWALK_TEST_THREADS=1 MPLBACKEND=Agg
.venv/bin/python -m pytest -p no:cacheprovider "$@" > .cache/tests-tl4.log 2>&1 &
tl4=$!
.venv-tl3/bin/python -m pytest -p no:cacheprovider "$@" > .cache/tests-tl3.log 2>&1 &
tl3=$!
status=0
wait $tl4 || status=1
wait $tl3 || status=1
echo "=== tests on transformer-lens 3.9 (HookedTransformer) ==="
cat .cache/tests-tl3.log
echo "=== tests on transformer-lens 4.x (TransformerBridge, tutorials) ==="
cat .cache/tests-tl4.log
exit $status
