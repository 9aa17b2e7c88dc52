"""The association capability on every architecture of the matrix (embedwalk.testing.FAMILIES),
in every mode the installed TransformerLens serves (bridge raw and compatibility mode on TL 4,
HookedTransformer on TL 3), against an INDEPENDENT reference: the pristine Hugging Face model
run with an attention function that ignores queries and keys and averages the values
uniformly over the keys HF's own mask lets each query reach (causal, sliding window, not
padding). Families whose attention takes no pluggable function (GPT-Neo, XGLM, BLOOM, MPT,
Falcon) get the same uniform weights through their softmax instead.

Each cell is exact (log-probs within 1e-4) or a clear EmbedwalkError; none is silently wrong.
The real swap effect is checked to be large, so no comparison is vacuous."""

import contextlib
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

import embedwalk as ew
from embedwalk.association import UniformSwap, association_bias, downstream
from embedwalk.errors import EmbedwalkError
from embedwalk.testing import FAMILIES, matrix_case, matrix_modes, tiny_model

TEXTS = ["w5 w6 w7 w8 w9 w10 w11 w12", "w9 w10 w40", "w3 w4 w5 w30 w31 w32"]


def _batch():
    """BOS + word ids, left-padded with id 0: the same ids for every family and generation."""
    rows = [[1] + [int(w[1:]) for w in t.split()] for t in TEXTS]
    n = max(map(len, rows))
    tokens = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (n - len(r)) + [True] * len(r) for r in rows])
    return tokens, mask
TARGETS = {"all": "all", "layer": [1], "head": [(0, 1), (1, 3)]}
CASES = [(f, m) for f in FAMILIES for m in matrix_modes(f)]


def _heads_of(targets, n_layers, n_heads):
    if targets == "all":
        return {l: list(range(n_heads)) for l in range(n_layers)}
    if isinstance(targets[0], int):
        return {l: list(range(n_heads)) for l in targets}
    out = {}
    for l, h in targets:
        out.setdefault(l, []).append(h)
    return out


def _uniform_weights(allowed: torch.Tensor) -> torch.Tensor:
    w = allowed.double()
    return w / w.sum(-1, keepdim=True).clamp_min(1.0)


class _Reference:
    """Runs the pristine HF model with chosen heads' attention replaced by uniform weights."""

    def __init__(self, hf):
        self.hf, self.chosen, self.calls = hf, {}, 0

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
        layer = getattr(module, "layer_idx", None)
        heads = self.chosen.get(layer if layer is not None else self.calls, [])
        self.calls += 1
        if heads:
            b, h, q, k = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
            if attention_mask is None:
                allowed = torch.ones(q, k, dtype=torch.bool).tril()[None, None].expand(b, 1, q, k)
            elif attention_mask.dtype == torch.bool:
                allowed = attention_mask
            else:
                allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            u = _uniform_weights(allowed[:, :, :, :k].expand(b, 1, q, k))
            v = value.double().repeat_interleave(h // value.shape[1], dim=1)
            uni = (u @ v).transpose(1, 2).to(out.dtype)  # [b, q, h, d]
            out = out.clone()
            out[:, :, heads] = uni[:, :, heads]
        return out, weights

    def softmax(self, original):
        def fn(x, dim=-1, *args, **kwargs):
            result = original(x, dim, *args, **kwargs)
            if x.ndim == 3:  # XGLM folds heads into the batch: [batch * heads, q, k]
                h = self.hf.config.num_attention_heads
                return fn(x.view(-1, h, *x.shape[1:]), dim, *args, **kwargs).view(x.shape)
            if x.ndim != 4:
                return result
            heads = self.chosen.get(self.calls, [])
            self.calls += 1
            if heads:
                allowed = (x > torch.finfo(x.dtype).min / 2) & torch.isfinite(x)
                result = result.clone()
                result[:, heads] = _uniform_weights(allowed[:, heads]).to(result.dtype)
            return result
        return fn

    @contextlib.contextmanager
    def swapped(self, chosen):
        self.chosen, self.calls = chosen, 0
        name = "embedwalk_uniform_reference"
        # Families whose modeling code routes attention through transformers' interface have an
        # eager_attention_forward; the others (GPT-Neo, XGLM, BLOOM, MPT, Falcon) compute inline.
        pluggable = hasattr(sys.modules[type(self.hf).__module__], "eager_attention_forward")
        if pluggable:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, eager_mask

            AttentionInterface.register(name, self.attention)
            AttentionMaskInterface.register(name, eager_mask)  # else a custom function gets no mask
            self.hf.set_attn_implementation(name)
        if pluggable:
            try:
                yield
            finally:
                self.hf.set_attn_implementation("eager")
            return
        original = F.softmax
        patched = self.softmax(original)
        F.softmax, torch.softmax = patched, patched
        try:
            yield
        finally:
            F.softmax, torch.softmax = original, torch._C._VariableFunctions.softmax


def _hf_logprobs(hf, tokens, mask):
    kwargs = {"attention_mask": mask.long()}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(tokens, **kwargs).logits.double().log_softmax(-1)


def _model_logprobs(model, tokens, mask, writers=(), readers=()):
    out = []
    ew.run(model, tokens, attention_mask=mask, writers=list(writers), readers=list(readers),
           on_logits=lambda lg, ctx: out.append(lg))
    return torch.cat(out).double().log_softmax(-1)


class _Watch(ew.Reader):
    """Watches every layer's pattern: the fast swap must keep the hook route there."""

    def hook_points(self, adapter):
        return [adapter.hook("pattern", l) for l in range(adapter.n_layers)]

    def read(self, name, value, ctx):
        pass


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def case(request):
    family, mode = request.param
    model, hf = matrix_case(family, mode)
    try:
        adapter = ew.adapt(model)
    except EmbedwalkError as err:  # a clear refusal is a valid cell
        assert str(err)
        pytest.skip(f"refused: {err}")
    tokens, mask = _batch()
    plain = _model_logprobs(model, tokens, mask)
    own = _hf_logprobs(hf, tokens, mask)
    # The reference runs the very model embedwalk sees; otherwise nothing below would mean anything.
    assert (plain - own)[mask].abs().max() < 1e-4, f"{family}/{mode}: model and HF disagree before any swap"
    return family, mode, model, hf, adapter, tokens, mask, plain


@pytest.mark.parametrize("unit", list(TARGETS))
def test_swap_equals_independent_reference(case, unit):
    family, mode, model, hf, a, tokens, mask, plain = case
    targets = TARGETS[unit]
    ref = _Reference(hf)
    with ref.swapped(_heads_of(targets, a.n_layers, a.n_heads)):
        want = _hf_logprobs(hf, tokens, mask)
    effect = float((want - plain)[mask].abs().max())
    assert effect > 0.05, f"{family}/{mode}: the real swap barely changes the model ({effect:.3g}); a vacuous check"
    for method in ("fast", "pattern"):
        got = _model_logprobs(model, tokens, mask, [UniformSwap(targets, method=method)])
        err = float((got - want)[mask].abs().max())
        assert err < 1e-4, f"{family}/{mode} {method} {unit}: {err:.3g} off the reference (effect {effect:.3g})"
    if unit == "all":
        # The bypass served every layer, and the hook route (forced by a reader on the skipped
        # path) gives the same logits: fast == hook route == independent reference.
        swap = UniformSwap(targets)
        _model_logprobs(model, tokens, mask, [swap])
        assert swap.bypassed_layers(a) == set(range(a.n_layers)), f"{family}/{mode}: no bypass"
        hooked_swap = UniformSwap(targets)
        got = _model_logprobs(model, tokens, mask, [hooked_swap], [_Watch()])
        assert hooked_swap.bypassed_layers(a) == frozenset()
        assert float((got - want)[mask].abs().max()) < 1e-4


def test_downstream_sees_the_real_effect(case):
    family, mode, model, hf, a, tokens, mask, plain = case
    for method in ("fast", "pattern"):
        eff = downstream(model, tokens, [0], attention_mask=mask, method=method)
        assert eff.kl > 1e-3, f"{family}/{mode} {method}: downstream reports no effect"


def test_attention_is_far_from_uniform(case):
    family, mode, model, hf, a, tokens, mask, plain = case
    res = association_bias(model, tokens, attention_mask=mask)
    assert float(res.distance.mean()) > 0.1, f"{family}/{mode}: attention is nearly uniform; checks would be vacuous"


_PROCESSED = {}


def _processed(family, mode):
    if (family, mode) not in _PROCESSED:
        if mode == "hooked":
            _PROCESSED[family, mode] = tiny_model(family, "hooked", stress=True, processed=True)
        else:
            _PROCESSED[family, mode] = matrix_case(family, "compat")[0]
    return _PROCESSED[family, mode]


INVARIANCE = [(f, m) for f in ("gpt2", "qwen2", "bloom", "opt", "gpt_neo", "starcoder2", "mistral", "gemma2")
              for m in matrix_modes(f) if m != "compat"]


@pytest.mark.parametrize("family,mode", INVARIANCE, ids=[f"{f}-{m}" for f, m in INVARIANCE])
def test_association_bias_is_invariant_to_weight_processing(family, mode):
    raw = matrix_case(family, mode)[0]
    processed = _processed(family, mode)
    tokens, mask = _batch()
    r = association_bias(raw, tokens, attention_mask=mask)
    p = association_bias(processed, tokens, attention_mask=mask)
    for name in ("distance", "cosine", "self_bias"):
        gap = float((getattr(r, name) - getattr(p, name)).abs().max())
        assert gap < 1e-5, f"{family}/{mode}: {name} moves by {gap:.3g} under weight processing"


WINDOWED = [(f, m) for f in ("mistral", "gpt_neo") for m in matrix_modes(f) if m != "compat"]


@pytest.mark.parametrize("family,mode", WINDOWED, ids=[f"{f}-{m}" for f, m in WINDOWED])
def test_prefix_keys_ignore_the_window(family, mode):
    """keys="prefix" averages over every earlier valid key: it equals the reference run of the
    same weights with the window removed, and differs from the default (reachable keys)."""
    import copy

    model, hf = matrix_case(family, mode)
    a = ew.adapt(model)
    assert any(a.attention_window(l) for l in range(a.n_layers))
    unwindowed = copy.deepcopy(hf)
    if family == "mistral":
        unwindowed.config.sliding_window = None
    else:  # GPT-Neo keeps its local mask in a buffer of each local attention
        for module in unwindowed.modules():
            if getattr(module, "attention_type", None) == "local" and "bias" in module._buffers:
                module.bias.copy_(torch.tril(torch.ones_like(module.bias)))
    tokens, mask = _batch()
    with _Reference(unwindowed).swapped(_heads_of("all", a.n_layers, a.n_heads)):
        want = _hf_logprobs(unwindowed, tokens, mask)
    for method in ("fast", "pattern"):
        prefix = _model_logprobs(model, tokens, mask, [UniformSwap(method=method, keys="prefix")])
        reachable = _model_logprobs(model, tokens, mask, [UniformSwap(method=method)])
        assert float((prefix - want)[mask].abs().max()) < 1e-4
        assert float((prefix - reachable)[mask].abs().max()) > 1e-2
    with pytest.raises(EmbedwalkError, match="keys must be"):
        UniformSwap(keys="window")


def test_pattern_route_is_probed_not_listed():
    """The probe finds the bridge classes whose hook_pattern fires after the module used its
    pattern (OPT, GPT-Neo, GPT-J, XGLM) from the model's behaviour alone."""
    from embedwalk.association.probes import attention_routes

    for family in ("opt", "gpt2", "mistral"):
        for mode in matrix_modes(family):
            try:
                a = ew.adapt(matrix_case(family, mode)[0])
            except EmbedwalkError:
                continue
            routes = attention_routes(a)
            expected = not (family == "opt" and mode != "hooked")
            assert routes.pattern_reaches_z == (expected,) * a.n_layers, (family, mode, routes)
            assert all(routes.v_before_z) and all(routes.pattern_fires)


@pytest.mark.skipif(ew.testing.installed_generation() != "bridge", reason="TL 3.9 has no MPT converter")
def test_mpt_alibi_bypass():
    """MPT (ALiBi, fused QKV; not in the matrix's families): fast (bypassed) and pattern swaps
    equal the HF reference."""
    import copy

    import transformers

    from embedwalk.models import wrap
    from embedwalk.testing import tiny_tokenizer

    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=200,
                                    initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    config.architectures = ["MptForCausalLM"]
    hf = transformers.MptForCausalLM(config).eval()
    model = wrap(copy.deepcopy(hf), tiny_tokenizer(), generation="bridge", name="tiny-mpt")
    a = ew.adapt(model)
    tokens, mask = _batch()
    with _Reference(hf).swapped(_heads_of("all", a.n_layers, a.n_heads)):
        want = _hf_logprobs(hf, tokens, mask)
    assert float((want - _hf_logprobs(hf, tokens, mask))[mask].abs().max()) > 0.05
    fast = UniformSwap()
    for swap in (fast, UniformSwap(method="pattern")):
        assert float((_model_logprobs(model, tokens, mask, [swap]) - want)[mask].abs().max()) < 1e-4
    assert fast.bypassed_layers(a) == {0, 1}
