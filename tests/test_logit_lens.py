"""The logit lens against the model's own logits and a float64 recomputation from run_with_cache."""

import pytest
import torch

import embedwalk as ew
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses import logit as logit_module
from embedwalk.lenses import logit_lens
from embedwalk.reduce import fused_available
from tolerance import entropy_tol, kl_tol, logprob_tol

TEXTS = ["w5 w6 w7 w8 w9 w10 w11", "w9 w10 w12", "w3 w4 w5 w30 w31"]


def _own_logprobs(model, text):
    """The exact log-probs of the model's own logits (float64 log-softmax: torch's float32
    one is itself off by up to 1.6e-5 on SmolLM2's vocabulary), as float32, and the tolerance
    a correct readout of its final residual meets (tests/tolerance.py)."""
    a = ew.adapt(model)
    toks = a.to_tokens(text)[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks, names_filter=[a.final_resid_hook])
        own = logits[0].double().log_softmax(-1)
    return toks[0], own.float(), logprob_tol(a, cache[a.final_resid_hook][0], own)


def test_final_readout_is_the_models_own_distribution(tiny):
    res = logit_lens(tiny, TEXTS, padding_side="left", batch_size=2)
    for p, text in enumerate(TEXTS):
        toks, own, tol = _own_logprobs(tiny, text)
        rows = (res.prompt == p).nonzero().flatten()
        assert res.pos[rows].tolist() == list(range(len(toks)))
        assert res.token[rows].tolist() == toks.tolist()
        T = len(toks)
        lp = res.target_logprob[-1, rows]
        assert torch.allclose(lp[:-1], own[torch.arange(T - 1), toks[1:]], atol=tol, rtol=0)
        assert torch.isnan(lp[-1]) and res.target_rank[-1, rows[-1]] == -1  # no next token
        top1 = own.gather(1, res.top_ids[-1, rows, :1])[:, 0]
        assert torch.equal(top1, own.max(-1).values)  # the argmax, up to exact ties
        ent = -(own.double().exp() * own.double()).sum(-1)
        assert ((res.entropy[-1, rows].double() - ent).abs() <= entropy_tol(tol, own)).all()
        assert (res.kl_to_final[-1, rows].abs() <= 2 * tol).all()  # kl_tol of a row with itself
    assert res.top1_agrees[-1].all()


def _reference(model, text, mid=False):
    """Every metric from run_with_cache, the model's readout and float64 arithmetic."""
    a = ew.adapt(model)
    toks = a.to_tokens(text)[None]
    points = a.readout_points(mid=mid)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[p.hook for p in points])
        lps = [a.readout(cache[p.hook][0]).double().log_softmax(-1) for p in points]
        tol = max(logprob_tol(a, cache[p.hook][0], lp) for p, lp in zip(points, lps))
    return toks[0], torch.stack(lps), tol  # [readout, pos, vocab], the log-prob tolerance


@pytest.mark.parametrize("chunk_size,block", [(3, None), (None, None), (None, 7), (5, 13)])
def test_every_metric_against_float64_recomputation(tiny_arch, chunk_size, block, monkeypatch):
    if block is not None:  # many vocabulary blocks, with a ragged last one, as on a real vocabulary
        monkeypatch.setattr(logit_module, "vocab_block", lambda device: block)
    res = logit_lens(tiny_arch, TEXTS, chunk_size=chunk_size, top_k=4, padding_side="right")
    for p, text in enumerate(TEXTS):
        toks, lp, tol = _reference(tiny_arch, text)
        rows = (res.prompt == p).nonzero().flatten()
        T = len(toks)
        tgt = toks[1:]
        ref_lp = lp[:, torch.arange(T - 1), tgt]
        assert torch.allclose(res.target_logprob[:, rows[:-1]].double(), ref_lp, atol=tol, rtol=0)
        ref_rank = (lp[:, : T - 1] > ref_lp[..., None]).sum(-1)
        # exact wherever no other entry lies within rounding of the target (the log-normaliser
        # is common to all entries of a row, so only the logits' own rounding can reorder them)
        near = ((lp[:, : T - 1] - ref_lp[..., None]).abs() <= tol).sum(-1)
        assert ((res.target_rank[:, rows[:-1]] - ref_rank).abs() <= near - 1).all()
        clear = near == 1
        assert torch.equal(res.target_rank[:, rows[:-1]][clear], ref_rank[clear])
        ref_ent = -(lp.exp() * lp).sum(-1)
        assert ((res.entropy[:, rows].double() - ref_ent).abs() <= entropy_tol(tol, lp)).all()
        ref_kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
        assert ((res.kl_to_final[:, rows].double() - ref_kl).abs() <= kl_tol(tol, lp[-1], lp)).all()
        top_p, _ = lp.exp().topk(4, -1)
        assert torch.allclose(res.top_probs[:, rows].double(), top_p, atol=tol, rtol=0)  # |dp| <= p |dlog p|
        final = lp[-1].exp()
        agree = final.gather(1, lp.argmax(-1).T).T >= final.max(-1).values - 1e-9
        untied = (top_p[..., 0] - top_p[..., 1]) > 2 * tol
        assert torch.equal(res.top1_agrees[:, rows][untied], agree[untied])


def test_chunking_changes_nothing_and_mid_readouts(tiny_arch):
    a = ew.adapt(tiny_arch)
    big = logit_lens(tiny_arch, TEXTS, mid=True, chunk_size=4096)
    small = logit_lens(tiny_arch, TEXTS, mid=True, chunk_size=2)
    assert big.labels == ["embed"] + [x for l in range(a.n_layers) for x in (f"{l}.mid", str(l))]
    toks, lp, tol = _reference(tiny_arch, TEXTS[0], mid=True)
    rows = (big.prompt == 0).nonzero().flatten()
    # chunking changes only the GEMM's row blocking: the two runs are two correct computations
    assert torch.allclose(big.metric("target_logprob"), small.metric("target_logprob"), atol=tol, rtol=0, equal_nan=True)
    assert ((big.entropy[:, rows] - small.entropy[:, rows]).abs() <= entropy_tol(tol, lp)).all()
    ref_kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    assert ((big.kl_to_final[:, rows] - small.kl_to_final[:, rows]).abs() <= kl_tol(tol, lp[-1], lp)).all()
    assert ((big.kl_to_final[:, rows].double() - ref_kl).abs() <= kl_tol(tol, lp[-1], lp)).all()


def test_positions_targets_and_readouts(tiny_arch):
    a = ew.adapt(tiny_arch)
    last = logit_lens(tiny_arch, TEXTS, positions="last", targets=["w7", 8, "w9"], readouts=[0, "0", -1], padding_side="left")
    assert last.labels == ["embed", "0", str(a.n_layers - 1)]
    assert last.pos.tolist() == [7, 3, 5] and last.target.tolist() == [7, 8, 9]
    toks, own, tol = _own_logprobs(tiny_arch, TEXTS[1])
    assert torch.allclose(last.target_logprob[-1, 1], own[-1, 8], atol=tol, rtol=0)
    some = logit_lens(tiny_arch, TEXTS[0], positions=[0, -1], targets="w11")
    assert some.pos.tolist() == [0, 7] and some.target.tolist() == [11, 11]
    # a [batch, pos] target tensor aligned with token inputs (and their padding)
    tokens = torch.tensor([[1, 5, 6, 7], [1, 9, 10, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    targets = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 0]])
    r = logit_lens(tiny_arch, tokens, attention_mask=mask, targets=targets)
    assert r.target.tolist() == [20, 21, 22, 23, 30, 31, 32]
    with torch.no_grad():
        logits, cache = tiny_arch.run_with_cache(tokens[1:, :3], names_filter=[a.final_resid_hook])
        own = logits[0].double().log_softmax(-1)
    tol = logprob_tol(a, cache[a.final_resid_hook][0], own)
    assert torch.allclose(r.target_logprob[-1, 4:].double(), own[torch.arange(3), torch.tensor([30, 31, 32])], atol=tol, rtol=0)


def test_bad_input_is_named(tiny_arch):
    with pytest.raises(EmbedwalkError, match="out of range"):
        logit_lens(tiny_arch, TEXTS, readouts=[99])
    with pytest.raises(EmbedwalkError, match="no readout labelled"):
        logit_lens(tiny_arch, TEXTS, readouts=["17"])
    with pytest.raises(EmbedwalkError, match="position 9 is out of range for prompt 0"):
        logit_lens(tiny_arch, TEXTS, positions=[9])
    with pytest.raises(EmbedwalkError, match="not one"):
        logit_lens(tiny_arch, TEXTS, targets="w5 w6")
    with pytest.raises(EmbedwalkError, match="3 prompts"):
        logit_lens(tiny_arch, TEXTS, targets=[5, 6])
    with pytest.raises(EmbedwalkError, match="shape"):
        logit_lens(tiny_arch, torch.tensor([[1, 5, 6]]), targets=torch.tensor([[5, 6]]))
    with pytest.raises(EmbedwalkError, match="top_k"):
        logit_lens(tiny_arch, TEXTS, top_k=0)


def test_dataframe_and_plots(tiny_arch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.figure
    res = logit_lens(tiny_arch, TEXTS[:2], top_k=3)
    df = res.to_dataframe()
    n_rows = res.prompt.numel()
    assert len(df) == n_rows * len(res.labels)
    for col in ("prompt", "pos", "layer", "token", "target", "target_logprob", "target_rank", "entropy",
                "kl_to_final", "top1_agrees", "top1_token", "top3_token", "top3_prob"):
        assert col in df.columns
    row = df[(df.prompt == 0) & (df.pos == 1) & (df.layer == "embed")].iloc[0]
    assert row.token == "w5" and row.target == "w6"
    i = int(((res.prompt == 0) & (res.pos == 1)).nonzero())
    assert row.top1_token == f"w{int(res.top_ids[0, i, 0])}"
    assert isinstance(res.plot(), matplotlib.figure.Figure)
    assert isinstance(res.plot("target_logprob", prompt=1), matplotlib.figure.Figure)
    assert isinstance(res.plot(kind="lines"), matplotlib.figure.Figure)
    with pytest.raises(EmbedwalkError, match="prompt 5"):
        res.plot(prompt=5)


@pytest.mark.smollm
def test_smollm2_final_readout_and_paris(smollm2):
    texts = ["The capital of France is", "Water boils at one hundred degrees"]
    res = logit_lens(smollm2, texts, readouts=[20, -1], top_k=3)
    for p, text in enumerate(texts):
        toks, own, tol = _own_logprobs(smollm2, text)
        rows = (res.prompt == p).nonzero().flatten()
        T = len(toks)
        assert torch.allclose(res.target_logprob[-1, rows[:-1]], own[torch.arange(T - 1), toks[1:]], atol=tol, rtol=0)
        assert torch.equal(res.top_ids[-1, rows, 0], own.argmax(-1))
    df = res.to_dataframe()
    last = df[(df.prompt == 0) & (df.layer == "29")].sort_values("pos").iloc[-1]
    assert last.top1_token == " Paris"
    assert (df[df.layer == "19"].kl_to_final > 0.01).all()  # a middle layer is far from the final


def test_layers_spelling_is_refused_with_the_new_name(tiny_arch):
    """`layers=` counts blocks everywhere; the lenses count readouts under `readouts=`."""
    from embedwalk.lenses.logit import LogitLensReader
    from embedwalk.lenses.tuned import TunedLens, train_tuned_lens

    for call in (
        lambda: logit_lens(tiny_arch, TEXTS, layers=[1]),
        lambda: LogitLensReader(layers=[1]),
        lambda: train_tuned_lens(tiny_arch, TEXTS, layers=[1]),
        lambda: TunedLens.for_model(tiny_arch, layers=[1]),
    ):
        with pytest.raises(EmbedwalkError, match=r"renamed `readouts=`.*0 = embedding"):
            call()
    # readout l + 1 is block l's output: the label says so
    a = ew.adapt(tiny_arch)
    last_block = a.n_layers - 1
    res = logit_lens(tiny_arch, TEXTS[0], readouts=[last_block + 1, "embed"], positions="last")
    assert res.labels == [str(last_block), "embed"]
    with pytest.raises(EmbedwalkError, match="out of range"):
        logit_lens(tiny_arch, TEXTS[0], readouts=[a.n_layers + 1])


def test_smollm2_entropy_and_kl_accurate_to_float64(smollm2):
    """Entropy and KL over the 49k vocabulary against a float64 recomputation from the model's
    own readout, within what the rounding of the logits allows (tests/tolerance.py; the KL's
    tolerance grows with the KL of early readouts, ~200 nats). The accumulation itself is
    checked tighter in tests/test_reduce.py."""
    text = "The quick brown fox jumps over the lazy dog because it was bored."
    res = logit_lens(smollm2, text, top_k=1, progress=False)
    a = ew.adapt(smollm2)
    points = a.readout_points()
    toks = a.to_tokens(text)[None]
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(toks, names_filter=[p.hook for p in points])
        lp = torch.stack([a.readout(cache[p.hook][0]).double().log_softmax(-1) for p in points])
        tol = max(logprob_tol(a, cache[p.hook][0], x) for p, x in zip(points, lp))
    ent = -(lp.exp() * lp).sum(-1)
    kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    assert ((res.entropy.double() - ent).abs() <= entropy_tol(tol, lp)).all()
    assert ((res.kl_to_final.double() - kl).abs() <= kl_tol(tol, lp[-1], lp)).all()


def test_fused_reduction_gives_the_eager_numbers(tiny_arch, monkeypatch):
    monkeypatch.setattr(logit_module, "vocab_block", lambda device: 11)
    eager = logit_lens(tiny_arch, TEXTS, fused=False, mid=True)
    if not fused_available("cpu"):
        with pytest.raises(EmbedwalkError, match="fused=True, but"):
            logit_lens(tiny_arch, TEXTS, fused=True)
        return
    fused = logit_lens(tiny_arch, TEXTS, fused=True, mid=True)
    for name in ("target_logprob", "entropy", "kl_to_final", "top_probs"):
        assert torch.allclose(getattr(eager, name), getattr(fused, name), atol=2e-6, equal_nan=True), name
    for name in ("target_rank", "top_ids", "top1_agrees"):
        assert torch.equal(getattr(eager, name), getattr(fused, name)), name
    with pytest.raises(EmbedwalkError, match="fused must be"):
        logit_lens(tiny_arch, TEXTS, fused="yes")


def test_a_readout_that_is_not_blockwise_is_refused(tiny, monkeypatch):
    """The lens forms logits a vocabulary block at a time; an output transform that mixes the
    vocabulary (here: centring each row) cannot be, and the adapter's check refuses it."""
    a = ew.adapt(tiny)
    monkeypatch.setattr(a, "_readout_parts", None, raising=False)
    monkeypatch.setattr(type(a), "output_transform", lambda self, z: z - z.mean(-1, keepdim=True))
    monkeypatch.setattr(a, "_output_scale", None, raising=False)
    with pytest.raises(ew.ArchitectureError, match="vocabulary block at a time"):
        logit_lens(tiny, TEXTS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_models_against_float64_of_their_own_logits(dtype, monkeypatch):
    """A 16-bit readout is read in the model's dtype, a vocabulary block at a time; every metric
    is the float64 arithmetic of the model's own 16-bit logits, and the rank, counted against a
    target logit rounded as the GEMM rounds it, is exact wherever the target is not tied."""
    from conftest import GENERATION
    from embedwalk.testing import tiny_model

    monkeypatch.setattr(logit_module, "vocab_block", lambda device: 37)
    model = tiny_model("llama", GENERATION, dtype=dtype)
    a = ew.adapt(model)
    res = logit_lens(model, TEXTS[0], top_k=3)
    toks = a.to_tokens(TEXTS[0])[None]
    points = a.readout_points()
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[p.hook for p in points])
        z = torch.stack([a.readout(cache[p.hook][0]).double() for p in points])  # [R, T, V]
        lp = z.log_softmax(-1)
        # the lens's blocks and the model's unembed are two 16-bit computations of the logits
        tol = max(logprob_tol(a, cache[p.hook][0], x) for p, x in zip(points, lp))
    T = toks.shape[1]
    tgt = toks[0, 1:]
    ref_lp = lp[:, torch.arange(T - 1), tgt]
    assert torch.allclose(res.target_logprob[:, :-1].double(), ref_lp, atol=tol, rtol=0)
    assert ((res.entropy.double() - -(lp.exp() * lp).sum(-1)).abs() <= entropy_tol(tol, lp)).all()
    zt = z[:, torch.arange(T - 1), tgt]
    ref_rank = (z[:, : T - 1] > zt[..., None]).sum(-1)
    untied = (z[:, : T - 1] == zt[..., None]).sum(-1) == 1
    assert torch.equal(res.target_rank[:, :-1][untied], ref_rank[untied])


def test_duplicate_readouts_and_non_finite_logits_are_refused():
    from conftest import GENERATION
    from embedwalk.testing import tiny_model

    model = tiny_model("llama", GENERATION)  # untied: a NaN embedding row leaves W_U finite
    a = ew.adapt(model)
    with pytest.raises(EmbedwalkError, match="readout '0' is selected twice"):
        logit_lens(model, TEXTS[0], readouts=[1, "0", "embed"])
    ids = a.to_tokens("w7")
    with torch.no_grad():
        model.W_E[ids[-1]] = float("nan")  # the model's own forward now yields NaN at that token
    with pytest.raises(EmbedwalkError, match="not finite"):
        logit_lens(model, TEXTS[0])
