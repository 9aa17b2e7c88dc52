"""Activation store: a store is only ever resumed or returned for the configuration and data
that wrote it, kept shards are checked byte for byte, and every read error names the shard."""

import json

import pytest
import torch

from conftest import Crash, make_tiny
from embedwalk.errors import EmbedwalkError
from embedwalk.store import cache_activations, open_store

TEXTS = [" ".join(f"w{(7 * i + j) % 190 + 2}" for j in range(2 + i % 5)) for i in range(24)]
KW = dict(layers=[1], batch_size=4, shard_rows=12, progress=False)

# Two lambdas in one module share module and qualname ('<lambda>'); only their code differs.
EVEN = lambda tokens, mask: (torch.arange(mask.shape[1]) % 2 == 0).expand_as(mask)  # noqa: E731
EVERY = lambda tokens, mask: torch.ones_like(mask)  # noqa: E731


@pytest.fixture(scope="module")
def gpt2():
    return make_tiny("gpt2")


def _interrupted(model, out, **kw):
    with pytest.raises(RuntimeError, match="crash"):
        cache_activations(model, TEXTS, out, readers=[Crash(3, out)], **{**KW, **kw})
    assert 0 < open_store(out, allow_partial=True).n_prompts < len(TEXTS)


def test_another_positions_function_is_another_configuration(gpt2, tmp_path):
    assert EVEN.__qualname__ == EVERY.__qualname__ and EVEN.__module__ == EVERY.__module__
    _interrupted(gpt2, tmp_path / "a", positions=EVEN)
    with pytest.raises(EmbedwalkError, match=r"different configuration[\s\S]*positions"):
        cache_activations(gpt2, TEXTS, tmp_path / "a", positions=EVERY, **KW)
    # a function redefined under the same name (a notebook cell run again with a new rule)
    ns = {}
    exec("import torch\ndef pick(tokens, mask):\n    return mask & (tokens % 2 == 0)", ns)
    _interrupted(gpt2, tmp_path / "b", positions=ns["pick"])
    first = ns["pick"]
    exec("import torch\ndef pick(tokens, mask):\n    return mask & (tokens % 3 == 0)", ns)
    assert first.__qualname__ == ns["pick"].__qualname__
    with pytest.raises(EmbedwalkError, match=r"different configuration[\s\S]*positions"):
        cache_activations(gpt2, TEXTS, tmp_path / "b", positions=ns["pick"], **KW)
    # closure values count too
    def every(k):
        return lambda tokens, mask: (torch.arange(mask.shape[1]) % k == 0).expand_as(mask)
    _interrupted(gpt2, tmp_path / "c", positions=every(2))
    with pytest.raises(EmbedwalkError, match=r"different configuration[\s\S]*positions"):
        cache_activations(gpt2, TEXTS, tmp_path / "c", positions=every(3), **KW)
    # the very same rule, defined again, resumes; the result equals an uninterrupted store
    done = cache_activations(gpt2, TEXTS, tmp_path / "c", positions=every(2), **KW)
    whole = cache_activations(gpt2, TEXTS, tmp_path / "whole", positions=every(2), **KW)
    assert torch.equal(done.get(slice(0, len(done))).tokens, whole.get(slice(0, len(whole))).tokens)


def test_a_callable_without_identity_must_be_named(gpt2, tmp_path):
    class Every:
        def __call__(self, tokens, mask):
            return torch.ones_like(mask)

    with pytest.raises(EmbedwalkError, match=r"cannot tell what the positions function.*positions_id="):
        cache_activations(gpt2, TEXTS, tmp_path / "s", positions=Every(), **KW)
    store = cache_activations(gpt2, TEXTS, tmp_path / "s", positions=Every(), positions_id="every-v1", **KW)
    assert store.manifest["config"]["positions"] == "named:every-v1"
    with pytest.raises(EmbedwalkError, match=r"different configuration[\s\S]*positions"):
        cache_activations(gpt2, TEXTS, tmp_path / "s", positions=Every(), positions_id="every-v2", **KW)


def test_a_complete_store_is_not_returned_for_other_data(gpt2, tmp_path):
    out = tmp_path / "s"
    kw = dict(layers=[1], positions="last", progress=False)
    first = cache_activations(gpt2, ["w2 w3", "w4 w5", "w6 w7"], out, **kw)
    assert len(first) == 3
    # the stored vectors' meaning depends on the residual basis: the configuration records it
    assert first.manifest["config"]["model"]["residual_basis"]["processed"] is False
    with pytest.raises(EmbedwalkError, match=r"shard-00000.safetensors.*differ from the data given now"):
        cache_activations(gpt2, ["w8 w9", "w10 w11", "w12 w13", "w14 w15"], out, **kw)
    with pytest.raises(EmbedwalkError, match=r"complete store of 3 prompts.*more.*new out directory"):
        cache_activations(gpt2, ["w2 w3", "w4 w5", "w6 w7", "w8 w9"], out, **kw)
    with pytest.raises(EmbedwalkError, match=r"data end after 2 prompts"):
        cache_activations(gpt2, ["w2 w3", "w4 w5"], out, **kw)
    assert len(cache_activations(gpt2, ["w2 w3", "w4 w5", "w6 w7"], out, **kw)) == 3  # same data: returned


def test_resume_checks_the_bytes_of_kept_shards(gpt2, tmp_path):
    out = tmp_path / "s"
    _interrupted(gpt2, out)
    shard = out / "shard-00000.safetensors"
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-3] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(bad))
    with pytest.raises(EmbedwalkError, match=r"shard-00000.safetensors is damaged \(its SHA-256 differs.*Delete it and every later"):
        cache_activations(gpt2, TEXTS, out, **KW)
    # the repair the message names: delete it and every later shard, rerun
    for p in out.glob("shard-*.safetensors"):
        p.unlink()
    repaired = cache_activations(gpt2, TEXTS, out, **KW)
    whole = cache_activations(gpt2, TEXTS, tmp_path / "whole", **KW)
    assert shard.read_bytes() == good
    shards = lambda d: [s["sha256"] for s in json.loads((d / "manifest.json").read_text())["shards"]]  # noqa: E731
    assert shards(out) == shards(tmp_path / "whole") and len(repaired) == len(whole)


def test_a_damaged_shard_header_names_the_shard_and_the_repair(gpt2, tmp_path):
    out = tmp_path / "s"
    cache_activations(gpt2, TEXTS, out, **KW)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[9] = ord("#")  # inside the JSON header, same size
    shard.write_bytes(bytes(data))
    store = open_store(out)  # sizes match; the header is read on first access
    with pytest.raises(EmbedwalkError, match=r"shard-00001.safetensors has a damaged header \(not valid JSON.*delete the damaged shard.*rerun"):
        store.get(slice(0, len(store)))
    with pytest.raises(EmbedwalkError, match=r"shard-00001.safetensors has a damaged header"):
        list(store.prompts())
    with pytest.raises(EmbedwalkError, match=r"shard-00001.safetensors is damaged"):
        cache_activations(gpt2, TEXTS, out, **KW)


def test_function_identity_follows_code_closures_and_globals():
    import functools

    from embedwalk.store.identity import Unidentifiable, function_identity

    def pad_pick(tokens, mask, k=2):
        return torch.nn.functional.pad(mask, (0, 0))[:, ::k]

    ident = function_identity(pad_pick)  # library calls are named, not walked
    assert ident == function_identity(pad_pick)
    assert function_identity(functools.partial(pad_pick, k=3)) != function_identity(functools.partial(pad_pick, k=2))
    assert function_identity(EVEN) != function_identity(EVERY)
    obj = object()
    with pytest.raises(Unidentifiable, match="closure variable 'obj'"):
        function_identity(lambda tokens, mask: mask if obj else mask)


def test_a_damaged_manifest_is_named(gpt2, tmp_path):
    out = tmp_path / "s"
    cache_activations(gpt2, TEXTS[:4], out, **KW)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:-40])
    with pytest.raises(EmbedwalkError, match=r"manifest.json is not valid JSON.*new directory"):
        open_store(out)
    manifest.write_text(json.dumps({"format": "embedwalk-activation-store", "format_version": 1}))
    with pytest.raises(EmbedwalkError, match=r"manifest.json lacks \['config', 'shards'.*damaged"):
        cache_activations(gpt2, TEXTS[:4], out, **KW)


def test_prompts_without_selected_rows_and_a_run_without_any(gpt2, tmp_path):
    # shard_rows=1: the last shard holds only prompts where nothing was selected (zero rows).
    texts = ["w2 w3 w4 w5 w6 w7", "w8 w9", "w5 w6 w7", "w9 w10"]
    w7 = gpt2.tokenizer.convert_tokens_to_ids("w7")
    pick = lambda tokens, mask: tokens == w7  # noqa: E731
    kw = dict(layers=[1], batch_size=1, shard_rows=1, progress=False)
    store = cache_activations(gpt2, texts, tmp_path / "some", positions=pick, **kw)
    want = [(i, j) for i, t in enumerate(texts) for j, tok in enumerate(gpt2.to_tokens(t)[0].tolist()) if tok == w7]
    again = open_store(tmp_path / "some", verify=True)
    got = again.get(slice(None))
    assert list(zip(got.prompt.tolist(), got.position.tolist())) == want
    assert again.n_prompts == 4 and again.prompts["n_rows"].tolist() == [1, 0, 1, 0]
    assert len(cache_activations(gpt2, texts, tmp_path / "some", positions=pick, **kw)) == 2  # resumes as complete
    with pytest.raises(EmbedwalkError, match="positions selected no rows in any of the 4 prompts"):
        cache_activations(gpt2, texts, tmp_path / "none", positions=lambda t, m: t == -1, **kw)


def test_positions_returning_indices_is_refused(gpt2, tmp_path):
    with pytest.raises(EmbedwalkError, match=r"positions must return a bool mask \[batch, pos\]"):
        cache_activations(gpt2, TEXTS, tmp_path / "i", positions=lambda t, m: torch.tensor([[0, 1]]), **KW)
    with pytest.raises(EmbedwalkError, match=r"got torch.int64"):  # 0/1 integers shaped like the mask too
        cache_activations(gpt2, TEXTS, tmp_path / "j", positions=lambda t, m: m.long(), **KW)
