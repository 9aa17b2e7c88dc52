"""The uniform-aggregation swap against an independent computation: the same HF weights run
by HF's own modules with hand-built uniform attention weights (float64)."""

import pytest
import torch

import embedwalk as ew
from tolerance import dot_tol, run_tols
from embedwalk.association import UniformSwap, resolve_targets, uniform_pattern, uniform_z
from embedwalk.errors import EmbedwalkError
from embedwalk.testing import tiny_hf

TEXTS = ["w5 w6 w7 w8 w9 w10 w11", "w9 w10", "w3 w4 w5 w30", "w20 w21 w22 w23 w24"]


def _arch(model):
    return "gpt2" if ew.adapt(model).has_pos_embed else "llama"


def _manual_uniform(exclude_self):
    """An HF attention function with explicit uniform weights over the keys HF's mask allows."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, q, _ = query.shape
        k = key.shape[2]
        if attention_mask is None:
            valid = torch.ones(b, 1, q, k, dtype=torch.bool).tril()
        elif attention_mask.dtype == torch.bool:
            valid = attention_mask
        else:
            valid = attention_mask > -1.0  # additive mask: 0 where allowed, dtype-min elsewhere
        valid = valid.expand(b, 1, q, k).clone()
        if exclude_self:
            eye = torch.eye(q, dtype=torch.bool)
            strict = valid & ~eye
            empty = ~strict.any(-1, keepdim=True)
            valid = torch.where(empty, valid & eye, strict)
        w = valid.double()
        w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
        v = value.double().repeat_interleave(h // value.shape[1], dim=1)
        out = (w @ v).to(value.dtype)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _hf_uniform_logits(arch, tokens, mask, monkeypatch, exclude_self=False):
    import transformers.models.gpt2.modeling_gpt2 as g
    import transformers.models.llama.modeling_llama as l

    hf = tiny_hf(arch)
    hf.set_attn_implementation("eager")
    fn = _manual_uniform(exclude_self)
    monkeypatch.setattr(g, "eager_attention_forward", fn)
    monkeypatch.setattr(l, "eager_attention_forward", fn)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(tokens, attention_mask=mask.long(), position_ids=pos).logits


def _swapped_logits(model, tokens, mask, swap):
    out = []
    ew.run(model, tokens, attention_mask=mask, writers=[swap], on_logits=lambda lg, ctx: out.append(lg))
    return torch.cat(out)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["fast", "pattern"])
def test_all_heads_swapped_equals_hand_run_hf(tiny_arch, side, method, monkeypatch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side=side)
    got = _swapped_logits(tiny_arch, tokens, mask, UniformSwap("all", method=method)).log_softmax(-1)
    want = _hf_uniform_logits(_arch(tiny_arch), tokens, mask, monkeypatch).log_softmax(-1)
    tol = run_tols(tiny_arch, tokens, mask, [UniformSwap("all", method=method)])["logprob"]
    assert torch.allclose(got[mask], want[mask], atol=tol, rtol=0)
    # and the swap changes the model by several tolerances (so the equality above could tell a
    # swapped model from an unswapped one; the tiny GPT-2's attention is close to uniform)
    with torch.no_grad():
        plain = tiny_arch(tokens, attention_mask=mask.long()).log_softmax(-1)
    assert (plain[mask] - got[mask]).abs().max() > 4 * tol


def test_exclude_self_equals_hand_run_hf(tiny_arch, monkeypatch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    want = _hf_uniform_logits(_arch(tiny_arch), tokens, mask, monkeypatch, exclude_self=True).log_softmax(-1)
    for method in ("fast", "pattern"):
        swap = UniformSwap(exclude_self=True, method=method)
        got = _swapped_logits(tiny_arch, tokens, mask, swap)
        tol = run_tols(tiny_arch, tokens, mask, [UniformSwap(exclude_self=True, method=method)])["logprob"]
        assert torch.allclose(got.log_softmax(-1)[mask], want[mask], atol=tol, rtol=0)


@pytest.mark.parametrize("targets", ["all", [1], [(0, 1), (1, 3)]])
def test_fast_path_equals_pattern_replacement(tiny, targets):
    a = ew.adapt(tiny)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    fast = _swapped_logits(tiny, tokens, mask, UniformSwap(targets, method="fast"))
    slow = _swapped_logits(tiny, tokens, mask, UniformSwap(targets, method="pattern"))
    tol = run_tols(tiny, tokens, mask, [UniformSwap(targets, method="pattern")])["logit"]
    assert torch.allclose(fast[mask], slow[mask], atol=tol, rtol=0)


def test_fast_equals_pattern_on_smollm2(smollm2):
    """Layer by layer, the z the model computes from the written uniform pattern equals the
    running mean of its v (what the fast path writes) to the rounding of a mean over the keys;
    end to end, through 30 swapped layers, within the forward's rounding (tests/tolerance.py,
    a loose bound at this depth), and with the same argmax everywhere."""
    text = ["The capital of France is Paris, and the capital of Italy is", "Hello there"]
    a = ew.adapt(smollm2)
    tokens, mask = ew.tokenize(a, text)
    worst = []

    class Check(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook(k, l) for l in range(adapter.n_layers) for k in ("v", "z")]

        def read(self, name, value, ctx):
            if name.endswith("hook_v"):
                ctx.state["v"] = value
                return
            z = value.reshape(*value.shape[:2], a.n_heads, a.d_head)
            zu = uniform_z(ctx.state["v"], a.reach(int(name.split(".")[1]), ctx.batch.mask), a.n_heads, a.n_kv_heads)
            # a mean of at most T values: within dot_tol of the largest |v|
            tol = float(dot_tol(ctx.state["v"].abs().max(), z.shape[1]))
            worst.append(float((z - zu)[ctx.batch.mask].abs().max()) / tol)

    slow = []
    ew.run(smollm2, tokens, attention_mask=mask, readers=[Check()], writers=[UniformSwap(method="pattern")],
           on_logits=lambda lg, ctx: slow.append(lg))
    assert len(worst) == a.n_layers and max(worst) <= 1
    fast = _swapped_logits(smollm2, tokens, mask, UniformSwap(method="fast"))
    slow = torch.cat(slow)
    tol = run_tols(smollm2, tokens, mask, [UniformSwap(method="pattern")])["logprob"]
    assert torch.allclose(fast.log_softmax(-1)[mask], slow.log_softmax(-1)[mask], atol=tol, rtol=0)
    assert (fast.argmax(-1) == slow.argmax(-1))[mask].all()


def test_only_chosen_heads_change(tiny_arch):
    """z of an untouched head equals the model's; z of a swapped head is the running mean of v."""
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS[:2])
    seen = {}

    class Grab(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook("z", 0), adapter.hook("v", 0)]

        def read(self, name, value, ctx):
            seen[name.split(".")[-1]] = value.reshape(*value.shape[:2], -1, a.d_head).clone()

    ew.run(tiny_arch, tokens, attention_mask=mask, readers=[Grab()])
    z0 = seen["hook_z"]
    ew.run(tiny_arch, tokens, attention_mask=mask, readers=[Grab()], writers=[UniformSwap([(0, 2)])])
    z1, v = seen["hook_z"], seen["hook_v"]
    keep = [0, 1, 3]
    assert torch.equal(z0[:, :, keep], z1[:, :, keep])
    kv = 2 // (a.n_heads // a.n_kv_heads)
    w = uniform_pattern(a.reach(0, mask)).double()
    want = w @ v[:, :, kv].double()
    tol = float(dot_tol(v.abs().max(), tokens.shape[1]))  # a float32 mean of at most T values
    assert torch.allclose(z1[:, :, 2][mask].double(), want[mask], atol=tol, rtol=0)


def test_uniform_pattern_rows():
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, False, False]])
    reach = torch.ones(5, 5, dtype=torch.bool).tril()[None] & mask[:, None, :]  # causal, real keys, by hand
    p = uniform_pattern(reach)
    assert torch.allclose(p[0, 4], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3]))
    assert torch.allclose(p[1, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0]))
    assert torch.allclose(p[1, 4], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0]))  # pad query: valid keys only
    assert p[0, 0].sum() == 0  # left-pad query: no valid key
    q = uniform_pattern(reach, exclude_self=True)
    assert torch.allclose(q[0, 2], torch.tensor([0.0, 0, 1, 0, 0]))  # first real: falls back to itself
    assert torch.allclose(q[0, 4], torch.tensor([0, 0, 0.5, 0.5, 0]))


def test_pattern_fn_custom_and_leak_check(tiny_arch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    same = _swapped_logits(tiny_arch, tokens, mask, UniformSwap(pattern_fn=lambda m, layer: uniform_pattern(a.reach(layer, m))))
    ref = _swapped_logits(tiny_arch, tokens, mask, UniformSwap(method="pattern"))
    assert torch.equal(same[mask], ref[mask])  # the same pattern written at the same hook

    def future(m, layer):
        n = m.shape[1]
        return torch.full((m.shape[0], n, n), 1.0 / n)

    with pytest.raises(EmbedwalkError, match="future or pad"):
        _swapped_logits(tiny_arch, tokens, mask, UniformSwap(pattern_fn=future))
    with pytest.raises(EmbedwalkError, match="pattern_fn returned"):
        _swapped_logits(tiny_arch, tokens, mask, UniformSwap(pattern_fn=lambda m, layer: torch.ones(3)))


def test_target_validation(tiny_arch):
    a = ew.adapt(tiny_arch)
    assert resolve_targets(a, "all") == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert resolve_targets(a, [-1]) == {1: [0, 1, 2, 3]}
    assert resolve_targets(a, [(1, 0), (0, -1), (1, 0)]) == {0: [3], 1: [0]}
    for bad, msg in [(7, "out of range"), ([(0, 9)], "head 9"), ([0, (1, 1)], "mixes"), ([], "no head"),
                     ("some", "string"), ([(0, 1, 2)], "pair")]:
        with pytest.raises(EmbedwalkError, match=msg):
            resolve_targets(a, bad)
    with pytest.raises(EmbedwalkError, match="method"):
        UniformSwap(method="magic")
