#!/usr/bin/env bash
# One command on a fresh machine: set up both TransformerLens generations, run the tests in both,
# and check that the built wheel installs and runs the quick start.
#   .venv      newest transformer-lens 4.x  (TransformerBridge fixtures, SmolLM2, README, tutorials)
#   .venv-tl3  transformer-lens 3.9         (HookedTransformer fixtures, SmolLM2, README)
# Arguments go to both pytest runs (e.g. -k lens). EMBEDWALK_SKIP_SETUP=1 uses the environments
# as they are; EMBEDWALK_TL4_VENV / EMBEDWALK_TL3_VENV name other ones.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 EMBEDWALK_CACHE=${EMBEDWALK_CACHE:-$PWD/.cache/embedwalk}
TL4=${EMBEDWALK_TL4_VENV:-.venv}
TL3=${EMBEDWALK_TL3_VENV:-.venv-tl3}
mkdir -p .cache
if [ "${EMBEDWALK_SKIP_SETUP:-0}" != 1 ]; then
  # The two environments are independent: build them side by side.
  bash scripts/setup.sh "$TL4" > .cache/setup-tl4.log 2>&1 &
  tl4=$!
  bash scripts/setup.sh "$TL3" "transformer-lens==3.9.0" > .cache/setup-tl3.log 2>&1 &
  tl3=$!
  ok=0
  wait $tl4 || ok=1
  wait $tl3 || ok=1
  cat .cache/setup-tl4.log .cache/setup-tl3.log
  [ $ok -eq 0 ] || { echo "setup failed" >&2; exit 1; }
fi

# Two cores, one thread per test process. The TL 3.9 run is short; the TL 4 run (tutorials
# included) is most of the work, so it gets two xdist workers ("worksteal": a worker that runs
# dry takes queued tests from the other, so the long notebooks do not line up on one core),
# and the wheel check follows the TL 3.9 run on the core that run frees.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 EMBEDWALK_TEST_THREADS=1 MPLBACKEND=Agg
start=$(date +%s)
"$TL4/bin/python" -m pytest -p no:cacheprovider -n 2 --dist worksteal "$@" > .cache/tests-tl4.log 2>&1 &
tl4=$!
(
  "$TL3/bin/python" -m pytest -p no:cacheprovider "$@" > .cache/tests-tl3.log 2>&1
  echo $? > .cache/tests-tl3.rc
  bash scripts/check_wheel.sh "$TL4" > .cache/wheel.log 2>&1
) &
lane=$!
wait $tl4; rc4=$?
wait $lane; rcw=$?
rc3=$(cat .cache/tests-tl3.rc)

echo "=== tests on transformer-lens 3.9 (HookedTransformer) ==="
cat .cache/tests-tl3.log
echo "=== tests on transformer-lens 4.x (TransformerBridge, README, tutorials; 2 workers) ==="
cat .cache/tests-tl4.log
echo "=== the built wheel in a fresh environment ==="
grep -v -E "GGUF tensors|Loading weights" .cache/wheel.log
echo "=== $(( $(date +%s) - start )) s: TL 3.9 exit $rc3, TL 4 exit $rc4, wheel check exit $rcw ==="

# pytest exits 5 when its arguments select no test: fine for one generation (a -k that matches
# only the other's tests), a failure when neither ran anything.
status=0
for rc in $rc3 $rc4; do
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || status=1
done
[ "$rc3" -eq 5 ] && [ "$rc4" -eq 5 ] && { echo "no test was selected" >&2; status=1; }
[ "$rcw" -eq 0 ] || status=1
exit $status
