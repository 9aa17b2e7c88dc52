"""Activation store, reading: zero-copy maps, random access, shuffled batches, filters, frames."""

import numpy as np
import pytest
import torch

from conftest import make_tiny
from embedwalk.errors import EmbedwalkError
from embedwalk.store import cache_activations, open_store

TEXTS = [" ".join(f"w{(5 * i + j) % 190 + 2}" for j in range(1 + i % 7)) for i in range(40)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = make_tiny("llama")
    out = tmp_path_factory.mktemp("store") / "s"
    meta = [{"label": i % 3, "split": "train" if i < 30 else "test"} for i in range(len(TEXTS))]
    return cache_activations(model, TEXTS, out, layers=[0], batch_size=4, shard_rows=25, metadata=meta, progress=False)


def test_random_access_matches_sequential_and_safetensors(store):
    from safetensors import safe_open

    full = store.get(slice(None))
    h = store.hooks[0]
    pieces = []
    for sh in store.shards:  # the official safetensors reader sees the same columns
        with safe_open(str(sh.path), "pt") as f:
            pieces.append(f.get_tensor(f"act.{h}"))
    assert torch.equal(torch.cat(pieces), full[h])
    idx = np.random.default_rng(0).permutation(len(store))[:37]
    part = store.get(idx)
    assert torch.equal(part[h], full[h][idx]) and torch.equal(part.prompt, full.prompt[idx])
    assert part.meta["label"] == [int(p) % 3 for p in full.prompt[idx]]
    assert torch.equal(store.get(-1)[h][0], full[h][-1])
    # a contiguous slice inside one shard is a view of the memory map: no copy
    a, b = store.get(slice(2, 9)), store.get(slice(2, 9))
    assert a[h].data_ptr() == b[h].data_ptr()
    with pytest.raises(EmbedwalkError, match="out of range"):
        store.get([len(store)])


def test_batches_shuffle_covers_every_row_once(store):
    seq = [b.row for b in store.batches(batch_size=16)]
    assert torch.equal(torch.cat(seq), torch.arange(len(store)))
    assert all(len(r) == 16 for r in seq[:-1])
    shuf = torch.cat([b.row for b in store.batches(batch_size=16, shuffle=True, shuffle_buffer=30, seed=1)])
    assert sorted(shuf.tolist()) == list(range(len(store)))
    assert not torch.equal(shuf, torch.arange(len(store)))
    again = torch.cat([b.row for b in store.batches(batch_size=16, shuffle=True, shuffle_buffer=30, seed=1)])
    assert torch.equal(shuf, again)  # seeded: reproducible
    h = store.hooks[0]
    for b in store.batches(batch_size=50, shuffle=True, shuffle_buffer=30):
        assert torch.equal(b[h], store.get(b.row)[h])


def test_filters_by_hook_layer_and_metadata(store):
    assert store.resolve(layers=[0]) == [store.hooks[0]]
    assert store.resolve("final") == [store.hooks[-1]]
    with pytest.raises(EmbedwalkError, match="not in this store"):
        store.resolve("resid_mid.0")
    rows = torch.cat([b.row for b in store.batches(hooks="final", batch_size=8, where={"split": "test", "label": [0, 1]})])
    want = [r for r in range(len(store)) if (p := int(store.get(r).prompt[0])) >= 30 and p % 3 in (0, 1)]
    assert rows.tolist() == want
    fn_rows = store.select(lambda df: df["prompt"] >= 30)
    assert len(fn_rows) == int((store.get(slice(None)).prompt >= 30).sum())
    batch = next(store.batches(hooks=["final"], batch_size=4))
    assert list(batch.vectors) == [store.hooks[-1]]


def test_dataframe_and_plot(store):
    df = store.to_dataframe(slice(0, 5))
    assert len(df) == 5 * len(store.hooks)
    assert {"row", "prompt", "position", "token", "hook", "label", "split", "vector"} <= set(df.columns)
    wide = store.to_dataframe(slice(0, 2), hooks="final", wide=True)
    assert wide.shape == (2, 7 + store.d_model)
    vectors = wide[[f"v{i}" for i in range(store.d_model)]].to_numpy()
    assert np.allclose(vectors, store.get(slice(0, 2))[store.hooks[-1]].float().numpy())
    matplotlib = pytest.importorskip("matplotlib")
    assert isinstance(store.plot(), matplotlib.figure.Figure)
    assert open_store(store.path).prompts["label"].tolist() == [i % 3 for i in range(len(TEXTS))]
