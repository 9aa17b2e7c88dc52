"""The uniform swap and association columns of the architecture matrix (tests/architectures.py).

Independent reference: the pristine Hugging Face model run with chosen heads' attention
replaced by uniform weights over the keys HF's own mask lets each query reach (causal,
sliding window, not padding): a transformers AttentionInterface function that ignores queries
and keys, or, for families whose attention takes no pluggable function (GPT-Neo, XGLM, BLOOM,
MPT, Falcon), the same uniform weights through their softmax. Each check also asserts that
the real effect is large, so that no comparison is vacuous.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch
import torch.nn.functional as F

import embedwalk as ew
from embedwalk.association import UniformSwap, association_bias, downstream
from embedwalk.testing import matrix_case, tiny_model

TARGETS = {"all": "all", "layer": [1], "head": [(0, 1), (1, 3)]}


def heads_of(targets, n_layers, n_heads):
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


class Reference:
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


def hf_logprobs(hf, tokens, mask):
    kwargs = {"attention_mask": mask.long()}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(tokens, **kwargs).logits.double().log_softmax(-1)


def model_logprobs(model, tokens, mask, writers=(), readers=()):
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


def batch():
    """The matrix's two prompts, left-padded (positions then start late in one row)."""
    from architectures import padded

    return padded("left")


def _effect(c, targets, tokens, mask):
    a = ew.adapt(c.model)
    with Reference(c.hf).swapped(heads_of(targets, a.n_layers, a.n_heads)):
        want = hf_logprobs(c.hf, tokens, mask)
    plain = hf_logprobs(c.hf, tokens, mask)
    effect = float((want - plain)[mask].abs().max())
    assert effect > 0.05, f"{c.family}/{c.mode}: the real swap barely changes the model ({effect:.3g})"
    return want, plain


def check_swap(c, method: str) -> float:
    """Largest log-prob gap of ``UniformSwap(method=...)`` by all / layer / head to the reference;
    for the fast method also the hook route (forced by a reader on the skipped path), and the
    bypass must serve every layer of an all-heads swap."""
    a = ew.adapt(c.model)
    tokens, mask = batch()
    gap = 0.0
    for unit, targets in TARGETS.items():
        want, _ = _effect(c, targets, tokens, mask)
        swap = UniformSwap(targets, method=method)
        gap = max(gap, float((model_logprobs(c.model, tokens, mask, [swap]) - want)[mask].abs().max()))
        if method == "fast" and unit == "all":
            assert swap.bypassed_layers(a) == set(range(a.n_layers)), f"{c.family}/{c.mode}: no bypass"
            hooked = UniformSwap(targets)
            got = model_logprobs(c.model, tokens, mask, [hooked], [_Watch()])
            assert hooked.bypassed_layers(a) == frozenset()
            gap = max(gap, float((got - want)[mask].abs().max()))
    return gap


def check_downstream(c) -> float:
    """downstream's KL(original || swapped) for layer 0, both methods, against the KL between
    the HF model and the HF reference (nats; the real effect must be non-zero)."""
    tokens, mask = batch()
    want, plain = _effect(c, [0], tokens, mask)
    kl = float((plain.exp() * (plain - want)).sum(-1)[mask].mean())
    assert kl > 1e-3
    return max(abs(downstream(c.model, tokens, [0], attention_mask=mask, method=m).kl - kl) for m in ("fast", "pattern"))


@functools.lru_cache(maxsize=None)
def _processed(family: str, mode: str):
    """The same weights with TransformerLens weight processing: compatibility mode on the
    bridge, TL 3's defaults (fold_ln, centring, fold_value_biases) for a HookedTransformer."""
    if mode == "hooked":
        return tiny_model(family, "hooked", stress=True, processed=True)
    return matrix_case(family, "compat")[0]


def check_association_bias(c) -> float:
    """association_bias of the raw model = that of the processed one (distance, cosine, self
    bias); attention is far from uniform (mean distance > 0.1)."""
    raw = matrix_case(c.family, "bridge")[0] if c.mode == "compat" else c.model
    tokens, mask = batch()
    r = association_bias(raw, tokens, attention_mask=mask)
    p = association_bias(_processed(c.family, c.mode), tokens, attention_mask=mask)
    assert float(r.distance.mean()) > 0.1, f"{c.family}/{c.mode}: attention nearly uniform"
    return max(float((getattr(r, k) - getattr(p, k)).abs().max()) for k in ("distance", "cosine", "self_bias"))


#: Columns appended to the matrix's CAPABILITIES: (check(case, tmp) -> gap, refused(case) -> reason).
ASSOCIATION = {
    "uniform swap (fast)": (lambda c, tmp: check_swap(c, "fast"), lambda c: None),
    "uniform swap (pattern)": (lambda c, tmp: check_swap(c, "pattern"), lambda c: None),
    "downstream": (lambda c, tmp: check_downstream(c), lambda c: None),
    "association_bias raw = processed": (lambda c, tmp: check_association_bias(c), lambda c: None),
}
