"""Casts to 16-bit dtypes: the IEEE ranges, and every 16-bit output of embedwalk refusing an
overflow by name (the activation store's own tests are in test_store_range.py)."""

from types import SimpleNamespace

import pytest
import torch

from embedwalk.association.prefix import Resume
from embedwalk.casting import cast_finite
from embedwalk.concepts.experiments import EmbedWriter
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Batch
from embedwalk.lenses.tuned import TunedLens

# float16's top binade [32768, 65536) has a step of 2**(15 - 10) = 32; IEEE round-to-nearest
# sends a value to inf from 65504 + 32 / 2 on (65520 itself ties to the even pattern, inf).
F16_INF_FROM = 65504 + 32 / 2


def test_cast_finite_follows_ieee_ranges():
    f16 = torch.float16
    assert cast_finite(torch.tensor([65519.0, -65519.0]), f16, what="x", fix="").tolist() == [65504.0, -65504.0]
    with pytest.raises(EmbedwalkError, match=r"x: index \[1\] is -65520, beyond float16's largest finite value 65504.*1 of 2 values.*use float32"):
        cast_finite(torch.tensor([1.0, -F16_INF_FROM]), f16, what="x", fix="use float32")
    # underflow is rounding, not an error: float16's smallest subnormal is 2**-24
    assert cast_finite(torch.tensor([2.0**-26, 2.0**-24]), f16, what="x", fix="").tolist() == [0.0, 2.0**-24]
    # bfloat16 has float32's exponent but 8 significant bits: its largest finite value is
    # (2 - 2**-7) * 2**127, its step there 2**120; float32 values from half a step above it
    # overflow (the tie goes to the even pattern, inf), the float32 just below (2**104 less) does not
    top = (2 - 2**-7) * 2.0**127
    assert cast_finite(torch.tensor([top + 2.0**119 - 2.0**104]), torch.bfloat16, what="x", fix="").item() == top
    with pytest.raises(EmbedwalkError, match=r"beyond bfloat16's largest finite value 3.38953e\+38"):
        cast_finite(torch.tensor([top + 2.0**119]), torch.bfloat16, what="x", fix="")
    # a float32 output is checked only when asked (the store asks)
    inf = torch.tensor([float("inf")])
    assert cast_finite(inf, torch.float32, what="x", fix="") is inf
    with pytest.raises(EmbedwalkError, match="x: index \\[0\\] is inf already before the cast to float32"):
        cast_finite(inf, torch.float32, what="x", fix="", check=True)


def test_a_tuned_lens_translation_beyond_float16_is_refused():
    lens = TunedLens(["3"], d_model=4, unembed_hash="")
    with torch.no_grad():
        lens.bias[0].copy_(torch.tensor([0.0, 1.0, F16_INF_FROM, 0.0]))
    h = torch.zeros(2, 4, dtype=torch.float16)
    # x + x W^T + b at x = 0 is b: row 0, dimension 2 holds 65520
    with pytest.raises(EmbedwalkError, match=r"translator at readout '3': row \[0\], dimension 2 is 65520, beyond float16's.*float32 or bfloat16"):
        lens(h, "3")
    assert lens(h.to(torch.bfloat16), "3").dtype == torch.bfloat16  # float32's range: held
    with torch.no_grad():
        lens.bias[0][2] = 65519.0  # rounds to 65504, finite
    assert lens(h, "3")[1, 2].item() == 65504.0


def test_inserted_and_resumed_vectors_beyond_float16_are_refused():
    d = 4
    ctx = SimpleNamespace(batch=Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[False, True, True], [True, True, True]]), torch.tensor([0, 1])))
    value = torch.zeros(2, 3, d, dtype=torch.float16)
    big = torch.zeros(1, d)
    big[0, 3] = 1e5
    writer = EmbedWriter([None, (torch.tensor([1]), big)])
    with pytest.raises(EmbedwalkError, match=r"vectors for prompt 1: position 1, dimension 3 is 100000, beyond float16's"):
        writer.write("hook_embed", value, ctx)
    assert writer.write("hook_embed", value.float(), ctx)[1, 1, 3].item() == 1e5  # a float32 model holds it
    resid = torch.zeros(2, 3, d)
    resid[1, 2, 0] = -1e6
    with pytest.raises(EmbedwalkError, match=r"resume at layer 1 .*row 1, position 2, dimension 0 is -1000000, beyond float16's"):
        Resume(1, resid).write("blocks.1.hook_resid_pre", value, ctx)
    own = resid.clamp(-100, 100).to(torch.float16)  # the model's own dtype: passed through unchecked
    assert Resume(1, own).write("blocks.1.hook_resid_pre", value, ctx) is own


def test_a_walk_state_beyond_float16_is_refused():
    from embedwalk.lenses.walk import nearest_tokens

    # the cast comes before any readout: an adapter of a float16 model needs only these fields here
    adapter = SimpleNamespace(W_E=torch.ones(8, 4, dtype=torch.float16), d_vocab=8, device="cpu", dtype=torch.float16)
    states = torch.zeros(3, 4)
    states[2, 1] = 7e4
    with pytest.raises(EmbedwalkError, match=r"walk state to read out: state 2, dimension 1 is 70000, beyond float16's"):
        nearest_tokens(adapter, states, 1)
