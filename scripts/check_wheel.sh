#!/usr/bin/env bash
# Build embedwalk's wheel, install the *built wheel* into a fresh virtual environment (with the
# tutorials' first cell, as on Colab before a release) and run the README's quick start there,
# so that a release ships what the tests tested (data files included).
#   scripts/check_wheel.sh [BASE_VENV]      (default .venv)
# The fresh environment reuses BASE_VENV's packages (torch, transformer-lens, the SmolLM2 wheel)
# through a plain path line in a .pth file, which does not run BASE_VENV's own .pth files, so
# its editable embedwalk stays invisible; the check asserts that embedwalk comes from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # nothing but the fresh environment and the wheel (a checkout on the path would hide it)
BASE=${1:-.venv}
B="$BASE/bin/python"
work=$(mktemp -d "${TMPDIR:-/tmp}/embedwalk-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

t0=$(date +%s)
# Isolated build (pip fetches setuptools) unless the environment already has a recent one.
if "$B" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  isolation=--no-build-isolation
else
  isolation=
fi
"$B" -m pip wheel --disable-pip-version-check -q --no-deps $isolation -w "$work/dist" . 2>&1 | grep -v -E "is ignored: it is neither|^$" || true
wheel=$(ls "$work"/dist/embedwalk-*.whl)
echo "built $(basename "$wheel")"

# The wheel holds the package and its data, nothing else (no tests, notebooks or caches).
"$B" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
stray = [n for n in names if not (n.startswith("embedwalk/") or ".dist-info/" in n) or "__pycache__" in n or n.endswith(".pyc")]
assert not stray, f"unexpected files in the wheel: {stray}"
for needed in ("embedwalk/data/text/essays.txt", "embedwalk/data/concepts/multiple_choice.jsonl"):
    assert needed in names, f"{needed} is missing from the wheel"
print(f"wheel contents: {len(names)} files, package and data only")
PY

"$B" -m venv "$work/venv"
V="$work/venv/bin/python"
fresh_site=$("$V" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$B" -c "import site; print('\n'.join(site.getsitepackages()))" > "$fresh_site/embedwalk-base-env.pth"
# Install it as a tutorial's first cell does on Colab before a release: the wheel lies in the
# notebook's folder and the cell's %pip installs it (its dependencies are already satisfied).
cp "$wheel" "$work/"
notebook="$PWD/tutorials/01_quickstart.ipynb"
(cd "$work" && "$V" - "$notebook" <<'PY'
import json, sys
from IPython.core.interactiveshell import InteractiveShell

cell = next(c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code")
result = InteractiveShell.instance().run_cell("".join(cell["source"]))
result.raise_error()
PY
)
"$V" -m pip show -q embedwalk > /dev/null  # installed into the fresh environment, not found elsewhere

# The README's quick start, run from outside the checkout with nothing else on the path.
"$B" - README.md > "$work/quickstart.py" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
print(re.search(r"```python\n(.*?)```", section, re.S).group(1))
PY
cat >> "$work/quickstart.py" <<'PY'

import sys
import embedwalk
from embedwalk.concepts import list_datasets
from embedwalk.lenses.tuned import sample_text

assert embedwalk.__file__.startswith(sys.prefix), f"embedwalk came from {embedwalk.__file__}, not the installed wheel"
assert sample_text("all") and len(list_datasets()) > 0  # the data files came with the wheel
print(lens.to_dataframe().shape, "rows x columns from embedwalk", embedwalk.__version__, "at", embedwalk.__file__)
PY
cd "$work"
MPLBACKEND=Agg "$V" quickstart.py
"$work/venv/bin/embedwalk" --help > /dev/null
echo "wheel check passed in $(( $(date +%s) - t0 )) s"
