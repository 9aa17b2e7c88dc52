"""Every requested hook point fires: gated points refused up front, unfired ones after batch 1."""

import pytest
import torch

import embedwalk as ew
from tolerance import run_tols
from embedwalk.errors import EmbedwalkError
from embedwalk.run import Reader, Writer

from conftest import GENERATION, make_tiny

TEXTS = ["w5 w6 w7 w8 w9", "w9 w10 w11"]


class Seen(Reader):
    def __init__(self, names):
        self.names, self.seen = list(names), []

    def hook_points(self, adapter):
        return self.names

    def read(self, name, value, ctx):
        self.seen.append(name)


class ZeroAt(Writer):
    def __init__(self, name):
        self.name = name

    def hook_points(self, adapter):
        return [self.name]

    def write(self, name, value, ctx):
        return torch.zeros_like(value)


class Logits:
    def __init__(self):
        self.out = []

    def __call__(self, logits, ctx):
        self.out.append(logits.clone())


@pytest.mark.parametrize("name, flag", [
    ("blocks.0.attn.hook_result", "use_attn_result"),
    ("blocks.1.hook_attn_in", "use_attn_in"),
    ("blocks.0.hook_q_input", "use_split_qkv_input"),
    ("blocks.0.hook_v_input", "use_split_qkv_input"),
    ("blocks.1.hook_mlp_in", "use_hook_mlp_in"),
])
def test_gated_hook_points_are_refused_naming_the_flag(tiny_arch, name, flag):
    with pytest.raises(EmbedwalkError, match=rf"cfg\.{flag} is on.*model\.set_{flag}\(True\)"):
        ew.run(tiny_arch, TEXTS, writers=[ZeroAt(name)])
    with pytest.raises(EmbedwalkError, match=rf"model\.set_{flag}\(True\)"):
        ew.run(tiny_arch, TEXTS, readers=[Seen([name])])
    assert sum(len(hp._forward_hooks) for hp in tiny_arch.hook_dict.values()) == 0


def test_with_the_flag_on_the_hook_result_edit_lands():
    model = make_tiny("gpt2")
    model.set_use_attn_result(True)
    a = ew.adapt(model)
    plain, edited, by_out = Logits(), Logits(), Logits()
    ew.run(model, TEXTS, on_logits=plain)
    ew.run(model, TEXTS, writers=[ZeroAt("blocks.0.attn.hook_result")], on_logits=edited)

    class OnlyBias(Writer):  # zero heads = attn_out is just b_O: an independent route to the same edit
        def hook_points(self, adapter):
            return [adapter.hook("attn_out", 0)]

        def write(self, name, value, ctx):
            return torch.zeros_like(value) + a.b_O(0)

    ew.run(model, TEXTS, writers=[OnlyBias()], on_logits=by_out)
    tokens, mask = ew.tokenize(a, TEXTS)
    tol = run_tols(model, tokens, mask, [OnlyBias()])["logit"]
    assert (edited.out[0] - plain.out[0]).abs().max() > 10 * tol
    assert torch.allclose(edited.out[0], by_out.out[0], atol=tol, rtol=0)


@pytest.mark.skipif(GENERATION != "bridge", reason="TL 4 bridges list hook points that never fire")
def test_a_requested_hook_point_that_never_fires_is_named():
    llama = make_tiny("llama")
    # The adapter's probe knows hook_pos_embed never runs on a rotary model: refused up front.
    with pytest.raises(EmbedwalkError, match=r"hook_pos_embed.*no position vector"):
        ew.run(llama, TEXTS, readers=[Seen(["hook_pos_embed"])])
    # A listed hook point the adapter does not probe is caught by run's after-the-batch check.
    silent = "rotary_emb.hook_out"
    assert silent in llama.hook_dict
    reader = Seen([silent, ew.adapt(llama).hook("resid_post", 0)])
    with pytest.raises(EmbedwalkError, match=rf"never fired.*{silent} \(for Seen\)"):
        ew.run(llama, TEXTS, readers=[reader])
    with pytest.raises(EmbedwalkError, match=rf"never fired.*{silent} \(for ZeroAt\)"):
        ew.run(llama, TEXTS, writers=[ZeroAt(silent)])
    assert sum(len(hp._forward_hooks) for hp in llama.hook_dict.values()) == 0


class UnmaskScores(Writer):
    """Rewrites the causally masked attention scores: values change, the output cannot."""

    def hook_points(self, adapter):
        return [adapter.hook("scores", 0)]

    def write(self, name, value, ctx):
        return torch.where(value < -1e20, torch.full_like(value, -1e30), value)


def test_check_edits_proves_an_edit_reached_the_logits(tiny_arch):
    a = ew.adapt(tiny_arch)
    plain, edited = Logits(), Logits()
    ew.run(tiny_arch, TEXTS, on_logits=plain)
    ew.run(tiny_arch, TEXTS, writers=[ZeroAt(a.hook("attn_out", 0))], check_edits=True, on_logits=edited)
    assert not torch.equal(plain.out[0], edited.out[0])
    with pytest.raises(EmbedwalkError, match=r"did not reach the output: UnmaskScores at \['blocks\.0\.attn\.hook_attn_scores'\]"):
        ew.run(tiny_arch, TEXTS, writers=[UnmaskScores()], check_edits=True)
    ew.run(tiny_arch, TEXTS, writers=[UnmaskScores()])  # not asked: no extra pass, no check
    swap = ew.UniformSwap("all")  # edits by replacing attention forwards (bypasses): they land
    ew.run(tiny_arch, TEXTS, writers=[swap], check_edits=True)
    assert swap.bypassed_layers(tiny_arch)
