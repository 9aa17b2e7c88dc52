"""Activation store, 16-bit range: a value the storage dtype cannot hold, or an inf/NaN the model
made itself, is refused by name (hook, prompt, position, value); nothing half-written is left."""

import json
import re
import time
from contextlib import contextmanager

import pytest
import torch

import embedwalk as ew
from conftest import make_tiny
from embedwalk.errors import EmbedwalkError
from embedwalk.run import Reader
from embedwalk.store import cache_activations, open_store

# Short prompts first: the scaled position 2 exists only from three tokens on (BOS included),
# so prompts 0 and 1 store finite float16 values and the overflow comes at prompt 2.
TEXTS = ["w5", "w9", "w6 w7", "w9 w10 w11 w12", "w3 w4"]
# float16's top binade [32768, 65536) has a step of 2**(15 - 10) = 32; IEEE round-to-nearest
# sends a value to inf from 65504 + 32 / 2 on (65520 itself ties to the even pattern, inf).
F16_INF_FROM = 65504 + 32 / 2
KW = dict(hooks=["resid_post.0"], batch_size=1, shard_rows=1, progress=False)


@contextmanager
def edited(model, name, edit):
    """A plain torch hook on ``name`` (registered before any of embedwalk's or run_with_cache's,
    so every reader sees the edited value); removed afterwards."""
    ew.adapt(model)  # the adapter's probe forward runs on the unedited model (it is cached)
    handle = model.hook_dict[name].register_forward_hook(lambda module, inputs, out: edit(out.clone()))
    try:
        yield
    finally:
        handle.remove()


def scale_position_2(out):
    out[:, 2:3] *= 1e7  # ~0.1-sized residual entries become ~1e6, past float16's 65504
    return out


def _references(model, name):
    """run_with_cache on each prompt alone, the path the store does not take."""
    a = ew.adapt(model)
    refs = []
    for text in TEXTS:
        with torch.no_grad():
            _, cache = model.run_with_cache(a.to_tokens(text)[None])
        refs.append(cache[name][0])
    return refs


class Settled(Reader):
    """Waits after each batch until the shard writer has finished that batch's shard (one prompt,
    one shard here), so the number of finished shards at the refusal is known exactly."""

    def __init__(self, out):
        self.out, self.n = out, 0

    def hook_points(self, adapter):
        return [adapter.final_resid_hook]

    def read(self, name, value, ctx):
        pass

    def end_batch(self, ctx):
        self.n += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(json.loads((self.out / "manifest.json").read_text())["shards"]) >= self.n:
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)


def _shards(out):
    return [(s["file"], s["sha256"]) for s in json.loads((out / "manifest.json").read_text())["shards"]]


def test_float16_overflow_is_refused_by_name_and_leaves_only_finished_shards(tiny_arch, tmp_path):
    a = ew.adapt(tiny_arch)
    name = a.hook("resid_post", 0)
    out = tmp_path / "f16"
    with edited(tiny_arch, name, scale_position_2):
        refs = _references(tiny_arch, name)
        # independently: the first (prompt, position, dimension) in collection order float16 cannot hold
        p, pos, dim = next((p, int(i), int(j)) for p, r in enumerate(refs) for i, j in (r.abs() >= F16_INF_FROM).nonzero())
        assert (p, pos) == (2, 2)
        with pytest.raises(EmbedwalkError) as err:
            cache_activations(tiny_arch, TEXTS, out, dtype="float16", readers=[Settled(out)], **KW)
        msg = str(err.value)
        assert f"hook {name}" in msg and f"prompt {p} 'w6 w7'" in msg and f"position {pos}" in msg and f"dimension {dim}" in msg
        assert "65504" in msg and "dtype=torch.float32" in msg and "bfloat16" in msg and "new directory" in msg
        # 9 significant digits give a float32 back exactly; batch_size=1 is run_with_cache's own forward
        value = float(re.search(r"dimension \d+ is (\S+), beyond", msg).group(1))
        assert torch.tensor(value, dtype=torch.float32) == refs[p][pos, dim]

        # only the shards of prompts 0 and 1 are there, complete and verified; nothing partial
        kept = open_store(out, allow_partial=True, verify=True)
        assert kept.n_prompts == p and len(_shards(out)) == p and not kept.manifest["complete"]
        assert not list(out.glob(".*.partial")) and sorted(f.name for f in out.glob("*.safetensors")) == [f for f, _ in _shards(out)]
        got = kept.get(slice(None))
        assert torch.isfinite(got[name].float()).all()
        for q in range(p):
            assert torch.equal(got[name][got.prompt == q], refs[q].to(torch.float16))
        # resuming the same call meets the same value again and leaves the store as it was
        before = _shards(out)
        with pytest.raises(EmbedwalkError, match=rf"prompt {p} .*position {pos} .*dimension {dim} is "):
            cache_activations(tiny_arch, TEXTS, out, dtype="float16", **KW)
        assert _shards(out) == before
        # batched and right-padded: index 2 of prompts 0 and 1 is a pad slot (scaled, never stored)
        with pytest.raises(EmbedwalkError, match=rf"prompt {p} 'w6 w7', position {pos} \(token 'w7'\)"):
            cache_activations(tiny_arch, TEXTS, tmp_path / "batched", dtype="float16", **{**KW, "batch_size": 4, "padding_side": "right"})

        # the fixes the message names: float32 and bfloat16 stores of the same values succeed
        f32 = cache_activations(tiny_arch, TEXTS, tmp_path / "f32", dtype="float32", **KW).get(slice(None))
        b16 = cache_activations(tiny_arch, TEXTS, tmp_path / "b16", dtype="bfloat16", **KW).get(slice(None))
    for q, ref in enumerate(refs):
        assert torch.equal(f32[name][f32.prompt == q], ref)
        assert torch.equal(b16[name][b16.prompt == q], ref.to(torch.bfloat16))
    assert float(b16[name].float().abs().max()) > F16_INF_FROM  # the values float16 refused, held


@pytest.fixture(scope="module")
def gpt2():
    return make_tiny("gpt2")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_the_models_own_inf_or_nan_is_refused_as_not_a_cast_problem(gpt2, bad, tmp_path):
    model = gpt2
    name = ew.adapt(model).hook("resid_post", 0)

    def poison(out):
        out[:, 2:3, 5:6] = bad
        return out

    with edited(model, name, poison):
        for dtype in ("float32", "float16"):
            with pytest.raises(EmbedwalkError) as err:
                cache_activations(model, TEXTS, tmp_path / dtype, dtype=dtype, **KW)
            msg = str(err.value)
            word = "inf" if bad == float("inf") else "NaN"
            assert f"prompt 2 'w6 w7', position 2 (token 'w7'), dimension 5 is {word} already before the cast" in msg
            assert f"not a {dtype} range problem" in msg and "model's own forward" in msg
