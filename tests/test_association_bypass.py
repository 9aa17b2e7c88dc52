"""The fast swap's bypass: a layer whose heads are all swapped runs values -> running mean ->
output projection, with no query-key path. Its logits are checked against hand-run HF and the
pattern method in test_association_swap.py; here: that the work is really skipped (counted
FLOPs), that it steps aside wherever a hook of the skipped path is watched, and that the
model is left as it was."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import embedwalk as ew
from tolerance import run_tols
from embedwalk.association import UniformSwap, uniform_z
from embedwalk.errors import EmbedwalkError
from embedwalk.mixing import mixing_forward

TEXTS = ["w5 w6 w7 w8 w9 w10 w11", "w9 w10", "w3 w4 w5 w30"]


def _logits(model, tokens, mask, writers=(), readers=()):
    out = []
    ew.run(model, tokens, attention_mask=mask, readers=readers, writers=writers,
           on_logits=lambda lg, ctx: out.append(lg.clone()))
    return torch.cat(out)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_bypass_skips_the_query_key_path(tiny):
    a = ew.adapt(tiny)
    tokens, mask = ew.tokenize(a, TEXTS)
    b, p = tokens.shape
    swap = UniformSwap(method="fast")
    _logits(tiny, tokens, mask, [swap])  # the one-time exactness probe runs outside the count
    plain = _flops(lambda: _logits(tiny, tokens, mask))
    fast = _flops(lambda: _logits(tiny, tokens, mask, [swap]))
    assert swap.bypassed_layers(a) == set(range(a.n_layers))
    # What the plain forward spends and the bypass does not: the query and key projections,
    # the scores and the pattern-times-values product (2 flops per multiply-add); the bypass's
    # uniform mean is a difference of running sums, which counts no matrix-product flops.
    projections = 2 * b * p * a.d_model * (a.n_heads + a.n_kv_heads) * a.d_head
    attention = 2 * 2 * b * a.n_heads * p * p * a.d_head
    assert plain - fast == a.n_layers * (projections + attention)


def test_watched_hook_points_keep_the_query_key_path(tiny_arch):
    """A reader at layer 0's pattern and a user TL hook at layer 1's scores: neither layer is
    bypassed, both see the model's own values, and the logits are those of the full bypass."""
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS)
    patterns, scores = [], []

    class Pattern(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook("pattern", 0)]

        def read(self, name, value, ctx):
            patterns.append(value.clone())

    reference = _logits(tiny_arch, tokens, mask, [UniformSwap(method="pattern")])
    _logits(tiny_arch, tokens, mask, readers=[Pattern()])

    swap = UniformSwap(method="fast")
    hp = tiny_arch.hook_dict[a.hook("scores", 1)]
    hp.add_hook(lambda value, hook: scores.append(value.shape))
    try:
        got = _logits(tiny_arch, tokens, mask, [swap], [Pattern()])
    finally:
        hp.remove_hooks()
    assert swap.bypassed_layers(a) == frozenset()
    assert torch.equal(patterns[1], patterns[0])  # the model's own pattern, as the fallback documents
    assert len(scores) == 1
    tol = run_tols(tiny_arch, tokens, mask, [UniformSwap(method="pattern")])["logit"]
    assert torch.allclose(got[mask], reference[mask], atol=tol, rtol=0)

    only_one = UniformSwap(method="fast")
    _logits(tiny_arch, tokens, mask, [only_one], [Pattern()])
    assert only_one.bypassed_layers(a) == {1}


def test_partly_swapped_layer_uses_hooks(tiny_arch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    targets = [(0, 1)] + [(1, h) for h in range(a.n_heads)]
    swap = UniformSwap(targets, method="fast")
    got = _logits(tiny_arch, tokens, mask, [swap])
    assert swap.bypassed_layers(a) == {1}
    want = _logits(tiny_arch, tokens, mask, [UniformSwap(targets, method="pattern")])
    tol = run_tols(tiny_arch, tokens, mask, [UniformSwap(targets, method="pattern")])["logit"]
    assert torch.allclose(got[mask], want[mask], atol=tol, rtol=0)


def test_bypass_is_removed_when_a_reader_fails(tiny_arch):
    a = ew.adapt(tiny_arch)
    tokens, mask = ew.tokenize(a, TEXTS)
    before = _logits(tiny_arch, tokens, mask)

    class Boom(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook("resid_post", 1)]

        def read(self, name, value, ctx):
            assert all("forward" in tiny_arch.blocks[l].attn.__dict__ for l in range(a.n_layers))
            raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        _logits(tiny_arch, tokens, mask, [UniformSwap()], [Boom()])
    assert not any("forward" in tiny_arch.blocks[l].attn.__dict__ for l in range(a.n_layers))
    assert torch.equal(_logits(tiny_arch, tokens, mask), before)


def test_bypass_refuses_cached_decoding(tiny_arch):
    a = ew.adapt(tiny_arch)
    bypass = mixing_forward(a, 0, lambda v: uniform_z(v, a.reach(0, torch.ones(v.shape[:2], dtype=torch.bool)),
                                                      a.n_heads, a.n_kv_heads))
    x = torch.randn(1, 3, a.d_model)

    class Filled:  # what HF's cache objects answer once they hold positions
        def get_seq_length(self, layer=0):
            return 3

    with pytest.raises(EmbedwalkError, match="key-value cache"):
        if a.generation == "bridge":
            bypass.forward(x, past_key_values=Filled())
        else:
            bypass.forward(x, x, x, object())
