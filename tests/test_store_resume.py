"""Activation store, safety: resume after SIGKILL is byte-identical; mismatches and damage are refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import GENERATION, Crash, make_tiny
from embedwalk.errors import EmbedwalkError
from embedwalk.store import cache_activations, open_store

TEXTS = [" ".join(f"w{(7 * i + j) % 190 + 2}" for j in range(1 + i % 5)) for i in range(96)]
KW = dict(hooks=["resid_post.0", "final"], batch_size=4, shard_rows=24, progress=False)

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads({threads})
    from embedwalk.run import Reader
    from embedwalk.store import cache_activations
    from embedwalk.testing import tiny_model

    class Slow(Reader):  # gives the parent time to kill us mid-run
        def hook_points(self, adapter): return [adapter.final_resid_hook]
        def read(self, name, value, ctx): pass
        def end_batch(self, ctx): time.sleep(0.1)

    texts = {texts!r}
    model = tiny_model("gpt2", {generation!r})
    cache_activations(model, texts, sys.argv[1], readers=[Slow()], **{kw!r})
    """
)


@pytest.fixture(scope="module")
def gpt2():
    return make_tiny("gpt2")


def _shards(path):
    return [(s["file"], s["sha256"]) for s in json.loads((path / "manifest.json").read_text())["shards"]]


def test_resume_after_sigkill_is_identical(gpt2, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(threads=torch.get_num_threads(), texts=TEXTS, generation=GENERATION, kw=KW))
    child = subprocess.Popen([sys.executable, str(script), str(killed)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (killed / "manifest.json").exists() and len(_shards(killed)) >= 2:
                break
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    before = _shards(killed)
    assert 2 <= len(before) and not json.loads((killed / "manifest.json").read_text())["complete"]
    with pytest.raises(EmbedwalkError, match="incomplete"):
        open_store(killed)
    resumed = cache_activations(gpt2, TEXTS, killed, **KW)
    reference = cache_activations(gpt2, TEXTS, whole, **KW)
    assert _shards(killed)[: len(before)] == before  # complete shards were kept, not rewritten
    assert _shards(killed) == _shards(whole)  # and every byte matches an uninterrupted run
    assert len(resumed) == len(reference) and resumed.n_prompts == len(TEXTS)
    assert not list(killed.glob(".*.partial"))


def test_other_config_or_other_data_refused(gpt2, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="crash"):
        cache_activations(gpt2, TEXTS, out, readers=[Crash(13, out)], **KW)
    done = open_store(out, allow_partial=True)
    assert 0 < done.n_prompts < len(TEXTS) and done.n_prompts % KW["batch_size"] == 0
    with pytest.raises(EmbedwalkError, match="different configuration[\\s\\S]*dtype"):
        cache_activations(gpt2, TEXTS, out, **{**KW, "dtype": "float32"})
    with pytest.raises(EmbedwalkError, match="different configuration[\\s\\S]*positions"):
        cache_activations(gpt2, TEXTS, out, positions="last", **KW)
    other = make_tiny("gpt2", seed=1)  # same shapes, other weights: the fingerprint tells them apart
    with pytest.raises(EmbedwalkError, match="written by another model .*the weights differ, the unembedding among them"):
        cache_activations(other, TEXTS, out, **KW)
    with pytest.raises(EmbedwalkError, match="shard-00000.safetensors.*differ"):
        cache_activations(gpt2, ["w3"] + TEXTS[1:], out, **KW)
    # the refused attempts left the store as it was; the right command finishes it
    assert cache_activations(gpt2, TEXTS, out, **KW).n_prompts == len(TEXTS)


def test_corrupt_or_truncated_shard_is_named(gpt2, tmp_path):
    out = tmp_path / "s"
    cache_activations(gpt2, TEXTS[:40], out, **KW)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_store(out)  # same size: only the checksum can tell
    with pytest.raises(EmbedwalkError, match="shard-00001.safetensors is corrupt"):
        open_store(out, verify=True)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(EmbedwalkError, match="shard-00001.safetensors is truncated"):
        open_store(out)
    with pytest.raises(EmbedwalkError, match="shard-00001.safetensors is damaged"):
        cache_activations(gpt2, TEXTS[:40], out, **{**KW, "shard_rows": 24})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "shard-00000.safetensors").write_bytes(b"junk")
    with pytest.raises(EmbedwalkError, match="no manifest"):
        cache_activations(gpt2, TEXTS, tmp_path / "x", **KW)
