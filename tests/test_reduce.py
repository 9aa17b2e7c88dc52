"""The vocabulary reductions (embedwalk.reduce) against a float64 recomputation: the eager and
the compiled block kernels, and the online merge of blocks."""

import pytest
import torch

from embedwalk.errors import EmbedwalkError
from embedwalk.reduce import VocabAccumulator, fused_available, rowdot, vocab_stats


def _case(m=3, n=5, V=5000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(m * n, V, generator=g) * 4).to(dtype)
    z[0, 100:140] = z[0, 7]  # ties with the target of row 0
    z[1, -3:] = z[1].max() + 1  # the maximum in the last (ragged) block
    q = torch.softmax(torch.randn(n, V, generator=g, dtype=torch.float64) * 3, -1)
    t = torch.randint(0, V, (m * n,), generator=g)
    t[0] = 7
    return z, q, t, m, n


def _reference(z, q, t, m, top_k):
    zd = z.double()
    lp = zd.log_softmax(-1)
    zt = zd.gather(1, t[:, None])
    qm = q.repeat(m, 1)
    return {
        "log_norm": torch.logsumexp(zd, -1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "above": (zd > zt).sum(-1),
        "cross": (qm * zd).sum(-1),
        "top": zd.topk(top_k, -1).values,
    }


def _accumulate(z, q, t, m, *, block, fused=False, top_k=4):
    acc = VocabAccumulator(top_k, fused=fused)
    zt = z.gather(1, t[:, None])[:, 0]
    for j0 in range(0, z.shape[1], block):
        acc.update(z[:, j0 : j0 + block], j0, zt, q[:, j0 : j0 + block].to(z.dtype), m)
    return acc.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [5000, 2048, 777])
def test_blocks_merge_to_the_float64_statistics(dtype, block):
    z, q, t, m, n = _case(dtype=dtype)
    st, vals, ids = _accumulate(z, q, t, m, block=block)
    ref = _reference(z, q, t, m, 4)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for name in ("log_norm", "entropy", "cross"):
        assert torch.allclose(getattr(st, name), ref[name], atol=tol, rtol=tol), name
    assert torch.equal(st.above, ref["above"])  # exact, ties included (row 0: 40 ties, none above)
    assert torch.allclose(vals.double(), ref["top"], atol=tol)
    assert torch.equal(z.gather(1, ids).double(), vals.double())  # the ids point at the values


def test_one_block_equals_vocab_stats_and_rowdot_is_accurate():
    z, q, t, m, n = _case()
    zt = z.gather(1, t[:, None])[:, 0]
    one = vocab_stats(z.view(m, n, -1), z.amax(-1).view(m, n), zt.view(m, n), q.float())
    st, _, _ = _accumulate(z, q, t, m, block=z.shape[1])
    for a, b in zip(one, st):
        assert torch.allclose(a.reshape(-1).double(), b.double(), atol=1e-9)
    a, b = torch.rand(4, 50_000), torch.rand(4, 50_000)
    assert torch.allclose(rowdot(a, b), (a.double() * b.double()).sum(-1), rtol=1e-7)


def test_fused_kernel_equals_eager_or_is_refused_by_name(monkeypatch):
    if not fused_available("cpu"):
        with pytest.raises(EmbedwalkError, match="not available"):
            fused_available("cpu", require=True)
        return
    z, q, t, m, n = _case()
    eager, ve, ie = _accumulate(z, q, t, m, block=2048)
    fused, vf, if_ = _accumulate(z, q, t, m, block=2048, fused=True)
    for name, a, b in zip(eager._fields, eager, fused):
        assert torch.allclose(a.double(), b.double(), atol=2e-6, rtol=1e-6), name
    assert torch.equal(ve, vf)


def test_fused_can_be_switched_off(monkeypatch):
    import embedwalk.reduce as reduce

    monkeypatch.setenv("EMBEDWALK_FUSED", "0")
    monkeypatch.setattr(reduce, "_UNAVAILABLE", {})
    monkeypatch.setattr(reduce, "_CHECKED", set())
    assert not fused_available("cpu")
    with pytest.raises(EmbedwalkError, match="EMBEDWALK_FUSED=0"):
        fused_available("cpu", require=True)
