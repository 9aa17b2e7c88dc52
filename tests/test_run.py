"""The run primitive: one pass, readers and writers composed, hooks always removed."""

import pytest
import torch

import embedwalk as ew
from tolerance import logprob_tol, resid_tol
from embedwalk.errors import EmbedwalkError
from embedwalk.run import Reader, Writer


class LastResid(Reader):
    """Collects the final residual at each prompt's last real token."""

    def __init__(self):
        self.rows = []

    def hook_points(self, adapter):
        return [adapter.final_resid_hook]

    def read(self, name, value, ctx):
        self.rows.append(value[torch.arange(value.shape[0]), ctx.batch.last].clone())

    def result(self):
        return torch.cat(self.rows)


class Boom(Reader):
    def hook_points(self, adapter):
        return [adapter.hook("resid_mid", 0)]

    def read(self, name, value, ctx):
        raise RuntimeError("boom")


class ZeroAttn(Writer):
    def hook_points(self, adapter):
        return [adapter.hook("attn_out", 0)]

    def write(self, name, value, ctx):
        return torch.zeros_like(value)


def _hook_count(model):
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


TEXTS = ["w5 w6 w7 w8 w9 w10", "w9 w10", "w3 w4 w5", "w20 w21 w22 w23"]


def test_padded_batch_equals_one_by_one(tiny):
    a = ew.adapt(tiny)
    (together,) = ew.run(tiny, TEXTS, readers=[LastResid()], batch_size=4)
    alone = torch.cat([ew.run(tiny, t, readers=[LastResid()])[0] for t in TEXTS])
    assert torch.allclose(together, alone, atol=resid_tol(a, alone), rtol=0)
    # and the readout of that vector is the model's own next-token distribution
    with torch.no_grad():
        own = tiny(a.to_tokens(TEXTS[1])[None])[0, -1].double().log_softmax(-1)
        mine = a.readout(alone[1]).double().log_softmax(-1)  # the padded row equals it (above)
    assert torch.allclose(mine, own, atol=logprob_tol(a, alone[1], own), rtol=0)


def test_left_padding_equals_right_padding(tiny_arch):
    right = ew.run(tiny_arch, TEXTS, readers=[LastResid()], padding_side="right")[0]
    left = ew.run(tiny_arch, TEXTS, readers=[LastResid()], padding_side="left")[0]
    assert torch.allclose(left, right, atol=resid_tol(ew.adapt(tiny_arch), right), rtol=0)


def test_writer_runs_before_reader_and_hooks_are_removed(tiny):
    before = _hook_count(tiny)
    plain = ew.run(tiny, TEXTS, readers=[LastResid()])[0]
    edited = ew.run(tiny, TEXTS, readers=[LastResid()], writers=[ZeroAttn()])[0]
    assert not torch.allclose(plain, edited, atol=1e-4)
    assert _hook_count(tiny) == before
    # after the writer is gone the model is untouched
    assert torch.allclose(ew.run(tiny, TEXTS, readers=[LastResid()])[0], plain)


def test_hooks_removed_and_mode_restored_when_reader_raises(tiny):
    before = _hook_count(tiny)
    tiny.train()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ew.run(tiny, TEXTS, readers=[LastResid(), Boom()], writers=[ZeroAttn()])
        assert _hook_count(tiny) == before
        assert tiny.training
    finally:
        tiny.eval()


def test_training_flags_restored_module_by_module():
    """A lone submodule in training mode is switched off for the run (dropout would change
    every number) and back on after it; eval modules stay eval."""
    from conftest import GENERATION
    from embedwalk.testing import tiny_model

    model = tiny_model("llama", GENERATION)
    leaves = [m for m in model.modules() if not list(m.children())]
    lone = leaves[3]
    lone.train()
    seen = []

    class Watch(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.final_resid_hook]

        def read(self, name, value, ctx):
            seen.append(lone.training or model.training)

        def result(self):
            return None

    ew.run(model, TEXTS, readers=[Watch()])
    assert seen and not any(seen)
    assert lone.training and not model.training
    assert [m for m in model.modules() if m.training] == [lone]


def test_token_inputs_with_mask_and_bad_inputs(tiny):
    a = ew.adapt(tiny)
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = ew.run(tiny, tokens, attention_mask=mask, readers=[LastResid()])[0]
    alone = ew.run(tiny, tokens[1:, :2], readers=[LastResid()])[0]
    assert torch.allclose(out[1], alone[0], atol=resid_tol(a, alone), rtol=0)
    with pytest.raises(EmbedwalkError, match="vocabulary"):
        ew.run(tiny, torch.tensor([[5, a.d_vocab]]), readers=[LastResid()])
    with pytest.raises(EmbedwalkError, match="must match"):
        ew.run(tiny, tokens, attention_mask=mask[:, :3], readers=[LastResid()])
    with pytest.raises(EmbedwalkError, match="list of strings"):
        ew.run(tiny, 3.5, readers=[LastResid()])
    with pytest.raises(EmbedwalkError, match="Readers"):
        ew.run(tiny, "w5", readers=[object()])
