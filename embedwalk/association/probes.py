"""One-time checks that tell how a model's attention responds to edits at its hook points.

Which hook points an edit can reach is a property of the attention class, not of its name:
TransformerLens 4 bridges that delegate to the Hugging Face module (OPT, GPT-Neo, GPT-J,
XGLM) fire ``hook_pattern`` only after the module has already used its pattern, so an edit
there never reaches ``hook_z``. Rather than keep a list of such classes, these probes run the
model once on a short input with edits in place and look at what happened.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from embedwalk.adapter import ModelAdapter

__all__ = ["AttentionRoutes", "attention_routes", "value_offset"]

_PROBE_LEN = 8
# Probe results are cached per adapter, not per model object: adapt() builds a new adapter
# when the model's mode or weights change (embedwalk.fingerprint), and a weight edit can
# change what an edit at a hook point reaches.
_ROUTES: "weakref.WeakKeyDictionary[ModelAdapter, tuple]" = weakref.WeakKeyDictionary()


def _heads(x: Tensor, n: int) -> Tensor:
    return x.reshape(*x.shape[:2], n, -1) if x.ndim == 3 else x


def _mode(adapter: ModelAdapter) -> tuple:
    return (bool(getattr(adapter.model, "compatibility_mode", False)),)


@contextmanager
def _probing(adapter: ModelAdapter, hooks: dict):
    """Run with only ``hooks`` ({hook name: fn(output) -> new or None}) on the model's hook
    points: hooks the user added are set aside so they neither fire on nor disturb the probe."""
    model = adapter.model
    points = set(model.hook_dict.values())
    saved = [(hp, hp._forward_hooks, hp._forward_pre_hooks) for hp in points]
    was_training = model.training
    try:
        for hp in points:
            hp._forward_hooks, hp._forward_pre_hooks = OrderedDict(), OrderedDict()
        for name, fn in hooks.items():
            model.hook_dict[name].register_forward_hook(lambda m, i, o, fn=fn: fn(o))
        model.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # TL 4 warns that a post-hoc pattern edit is discarded: finding that out is the point.
            warnings.simplefilter("ignore")
            yield
    finally:
        for hp, fwd, pre in saved:
            hp._forward_hooks, hp._forward_pre_hooks = fwd, pre
        model.train(was_training)


def _probe_tokens(adapter: ModelAdapter) -> Tensor:
    ids = (torch.arange(_PROBE_LEN) * 7919 + 3) % max(adapter.d_vocab - 2, 1) + 2  # spread, no special ids
    return ids[None].to(adapter.device)


@dataclass(frozen=True)
class AttentionRoutes:
    """Per layer, what the probe saw.

    ``pattern_reaches_z``: an edit at ``hook_pattern`` changes ``hook_z`` as the edited pattern
    says (``z = pattern @ v``). ``pattern_fires``: ``hook_pattern`` fires at all.
    ``v_before_z``: ``hook_v`` fires before ``hook_z``, so ``z`` can be computed from ``v``.
    """

    pattern_reaches_z: tuple
    pattern_fires: tuple
    v_before_z: tuple


def attention_routes(adapter: ModelAdapter) -> AttentionRoutes:
    """Probe once per adapter (model, compatibility mode and weights) which attention hook edits take effect.

    One forward on ``[1, 8]`` probe ids with every layer's pattern replaced by all weight on
    the first key: where the edit reaches ``z``, every query's ``z`` equals the first key's
    value. Raises ArchitectureError if ``hook_v`` or ``hook_z`` never fires.
    """
    cached = _ROUTES.get(adapter)
    if cached is not None and cached[0] == _mode(adapter):
        return cached[1]
    order: list = []
    seen: dict = {}

    def on_v(layer):
        def fn(out):
            order.append(("v", layer))
            seen[("v", layer)] = out.detach().clone()
        return fn

    def on_pattern(layer):
        def fn(out):
            order.append(("p", layer))
            first = torch.zeros_like(out)
            first[..., 0] = 1.0
            return first
        return fn

    def on_z(layer):
        def fn(out):
            order.append(("z", layer))
            seen[("z", layer)] = out.detach().clone()
        return fn

    hooks = {}
    for layer in range(adapter.n_layers):
        hooks[adapter.hook("v", layer)] = on_v(layer)
        hooks[adapter.hook("pattern", layer)] = on_pattern(layer)
        hooks[adapter.hook("z", layer)] = on_z(layer)
    with _probing(adapter, hooks):
        adapter.model(_probe_tokens(adapter))
    reaches, fires, v_first = [], [], []
    for layer in range(adapter.n_layers):
        for kind in ("v", "z"):
            if (kind, layer) not in seen:
                raise adapter.refuse(
                    "the uniform swap", f"{adapter.hook(kind, layer)} never fired, and the swap reads the "
                    "values and writes z there"
                )
        pos = {kind: order.index((kind, layer)) for kind in ("v", "p", "z") if (kind, layer) in order}
        v = _heads(seen[("v", layer)], adapter.n_kv_heads).to(torch.float32)
        z = _heads(seen[("z", layer)], adapter.n_heads).to(torch.float32)
        first = v[:, :1].repeat_interleave(adapter.n_heads // adapter.n_kv_heads, dim=2).expand_as(z)
        tol = 1e-4 * (1.0 + float(first.abs().max()))
        fires.append("p" in pos)
        reaches.append("p" in pos and pos["p"] < pos["z"] and float((z - first).abs().max()) <= tol)
        v_first.append(pos["v"] < pos["z"])
    routes = AttentionRoutes(tuple(reaches), tuple(fires), tuple(v_first))
    _ROUTES[adapter] = (_mode(adapter), routes)
    return routes


def value_offset(adapter: ModelAdapter) -> Tensor:
    """Per layer, the values a head reads when its block input is zero: ``Float[layer, kv_heads, d_head]``.

    Values are an affine function of the block input's normalized residual; this is its
    constant part (the value bias plus the norm's bias through ``W_V``), which TransformerLens
    weight processing moves into ``b_O`` (``fold_ln``, ``fold_value_biases``). Subtracting it
    from ``z`` gives the head output that weight processing leaves unchanged. Measured with the
    model's own modules: one forward with every layer's ``hook_resid_pre`` set to zero.
    """
    got: dict = {}

    def zero(out):
        return torch.zeros_like(out)

    def on_v(layer):
        def fn(out):
            got[layer] = _heads(out.detach(), adapter.n_kv_heads).to(torch.float32)
        return fn

    hooks = {}
    for layer in range(adapter.n_layers):
        hooks[adapter.hook("resid_pre", layer)] = zero
        hooks[adapter.hook("v", layer)] = on_v(layer)
    with _probing(adapter, hooks):
        adapter.model(_probe_tokens(adapter)[:, :2])
    rows = []
    for layer in range(adapter.n_layers):
        if layer not in got:
            raise adapter.refuse("association_bias", f"{adapter.hook('v', layer)} never fired; it reads the values there")
        v = got[layer]
        if float((v - v[:, :1]).abs().max()) > 1e-5 * (1.0 + float(v.abs().max())):
            raise adapter.refuse(
                "association_bias", f"the values of layer {layer} depend on the position even with a zero "
                "block input, so the value bias that TransformerLens weight processing moves cannot be separated"
            )
        rows.append(v[0, 0])
    return torch.stack(rows)


_BYPASS: "weakref.WeakKeyDictionary[ModelAdapter, tuple]" = weakref.WeakKeyDictionary()


def bypass_exact(adapter: ModelAdapter) -> bool:
    """Whether the bypass forwards of :mod:`embedwalk.mixing` reproduce the hook route on this
    model: checked once per adapter (model, compatibility mode and weights) on ``[1, 8]`` probe ids, every
    layer swapped to the running mean both ways, logits compared. Where it is not exact (or
    no layer has a bypass), the fast swap keeps the hook route.
    """
    from embedwalk.mixing import mixing_forward

    cached = _BYPASS.get(adapter)
    if cached is not None and cached[0] == _mode(adapter):
        return cached[1]
    tokens = _probe_tokens(adapter)

    def mix(v):
        g = adapter.n_heads // adapter.n_kv_heads
        mean = torch.cumsum(v.to(torch.float32), dim=1) / torch.arange(1, v.shape[1] + 1, device=v.device)[None, :, None, None]
        return mean.repeat_interleave(g, dim=2)

    layers = range(adapter.n_layers)
    bypasses = [mixing_forward(adapter, layer, mix) for layer in layers]
    exact = all(b is not None for b in bypasses)
    if exact:
        state: dict = {}

        def on_v(layer):
            def fn(out):
                state[layer] = out
            return fn

        def on_z(layer):
            def fn(out):
                z = mix(_heads(state.pop(layer), adapter.n_kv_heads)).to(out.dtype)
                return z.reshape(out.shape)
            return fn

        hooks = {}
        for layer in layers:
            hooks[adapter.hook("v", layer)] = on_v(layer)
            hooks[adapter.hook("z", layer)] = on_z(layer)
        with _probing(adapter, hooks):
            via_hooks = adapter.model(tokens).to(torch.float32)
        with _probing(adapter, {}):
            try:
                for b in bypasses:
                    object.__setattr__(b.module, "forward", b.forward)
                via_bypass = adapter.model(tokens).to(torch.float32)
            finally:
                for b in bypasses:
                    b.module.__dict__.pop("forward", None)
        with _probing(adapter, {}):
            plain = adapter.model(tokens).to(torch.float32)
        tol = (1e-4 if adapter.dtype == torch.float32 else 3e-2) * (1.0 + float(via_hooks.abs().max()))
        exact = float((via_bypass - via_hooks).abs().max()) <= tol < float((plain - via_hooks).abs().max())
    _BYPASS[adapter] = (_mode(adapter), exact)
    return exact
