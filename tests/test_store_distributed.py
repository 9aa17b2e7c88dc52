"""Activation store across processes: two ranks (RANK/WORLD_SIZE) merged equal one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import GENERATION, make_tiny
from tolerance import resid_tol
from embedwalk import adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.store import cache_activations, merge, open_store

TEXTS = [" ".join(f"w{(3 * i + j) % 190 + 2}" for j in range(1 + i % 6)) for i in range(30)]


def test_two_ranks_merged_equal_single_process(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "embedwalk.store.cli", "cache", "--model", "tiny-gpt2", "--generation", GENERATION,
           "--data", str(data), "--layers", "0", "--dtype", "float32", "--batch-size", "4", "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
    with pytest.raises(EmbedwalkError, match="merge"):
        open_store(out)
    merged = merge(out)
    single = cache_activations(make_tiny("gpt2"), data, tmp_path / "one", layers=[0], dtype="float32", batch_size=4, progress=False)
    assert len(merged) == len(single) and merged.n_prompts == single.n_prompts == len(TEXTS)
    assert merged.prompts[["prompt", "n_rows", "id"]].equals(single.prompts[["prompt", "n_rows", "id"]])
    # rank r took prompts r, r+2, ...; ordering rows by (prompt, position) lines the stores up
    m, s = merged.get(slice(None)), single.get(slice(None))
    key = lambda b: torch.argsort(b.prompt * 1000 + b.position.long())  # noqa: E731
    km, ks = key(m), key(s)
    assert torch.equal(m.tokens[km], s.tokens[ks])
    a = adapt(make_tiny("gpt2"))
    for h in single.hooks:  # other batches: two forwards that may round differently
        assert torch.allclose(m[h][km], s[h][ks], atol=resid_tol(a, s[h]), rtol=0)
    assert open_store(out, verify=True).manifest["ranks"] == ["rank-00000-of-00002", "rank-00001-of-00002"]
    # a missing rank is named instead of merged silently
    (out / "rank-00001-of-00002" / "manifest.json").unlink()
    with pytest.raises(EmbedwalkError, match="rank 1 of 2 is missing"):
        merge(out)
