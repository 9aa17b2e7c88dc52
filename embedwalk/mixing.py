"""Run an attention layer without its query-key path: ``z`` is a function of the values alone.

When a layer's pattern does not depend on the data (uniform causal aggregation is a running
mean of the values), the model's queries, keys, rotary, scores, mask and softmax are wasted
work, and a hook cannot skip them. :func:`mixing_forward` builds a replacement ``forward``
for one attention module that projects the values, mixes them, and applies the model's own
output projection, firing the model's hook points on the way (``hook_in``, ``hook_v``,
``hook_z``, ``hook_result``, ``hook_out``) so readers there compose unchanged. Hook points
of the skipped path (``hook_q``, ``hook_k``, ``hook_rot_*``, ``hook_attn_scores``,
``hook_pattern``) do not fire; :attr:`Bypass.silent` lists them so a caller can fall back.

Like :mod:`embedwalk.adapter`, this module knows the TransformerLens attention classes: TL 3
``Attention`` and ``GroupedQueryAttention``; on the TL 4 bridge the joint-QKV classes (GPT-2,
and with rotary NeoX, Phi-3, Falcon), BLOOM's (which adds the residual inside attention),
the rotary and ALiBi classes (Llama-like, MPT) and the delegating ``AttentionBridge`` (OPT,
GPT-J, GPT-Neo, XGLM). It returns ``None`` for a class or configuration it cannot reproduce
exactly (subclasses it does not know, split q/k/v inputs, clipped or quantised projections,
gated attention, bidirectional or cross attention), and the caller falls back to hooks;
:func:`embedwalk.association.probes.bypass_exact` checks each model once that the bypass
gives the hook route's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from embedwalk.adapter import ModelAdapter
from embedwalk.errors import EmbedwalkError

__all__ = ["Bypass", "Mixer", "mixing_forward"]

Mixer = Callable[[Tensor], Tensor]
"""``mix(v: Float[batch, pos, kv_heads, d_head]) -> Float[batch, pos, n_heads, d_head]``."""


@dataclass
class Bypass:
    """A replacement ``forward`` for ``module`` and the hook points it leaves unfired."""

    module: torch.nn.Module
    forward: Callable[..., Any]
    silent: frozenset  # HookPoint modules under ``module`` that the replacement never calls


def _hook_points(module: torch.nn.Module) -> set:
    from transformer_lens.hook_points import HookPoint

    return {m for m in module.modules() if isinstance(m, HookPoint)}


def _no_cache(has_cache: bool) -> None:
    # HF hands every forward a cache object; only one that already holds positions means
    # incremental decoding, where a running mean would need the earlier values.
    if has_cache:
        raise EmbedwalkError(
            "a bypassed attention layer (the fast uniform swap) runs whole prompts, but it got a "
            "key-value cache that already holds positions (cached generation). Use "
            "UniformSwap(method='pattern') there."
        )


def _cached_len(cache, layer: int) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        # This layer's own length: earlier layers of the same forward have already filled theirs.
        return int(cache.get_seq_length(layer))
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], Tensor):
        return int(cache[0].shape[-2])
    return 1  # an unknown cache: refuse rather than guess


def mixing_forward(adapter: ModelAdapter, layer: int, mix: Mixer) -> Optional[Bypass]:
    """A forward for ``blocks[layer].attn`` computing ``z = mix(v)``, or None if unsupported."""
    attn = adapter.model.blocks[layer].attn
    if adapter.generation == "bridge":
        return _bridge(attn, adapter, layer, mix)
    return _hooked(attn, mix)


def _heads(x: Tensor, n: int) -> Tensor:
    return x.reshape(*x.shape[:2], n, -1) if x.ndim == 3 else x


# --------------------------------------------------------------------------- TL 2.x / 3.x
def _hooked(attn, mix: Mixer) -> Optional[Bypass]:
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.utilities.attention import complex_attn_linear, simple_attn_linear

    cfg = attn.cfg
    if type(attn) not in (Attention, GroupedQueryAttention):
        return None
    direction = getattr(attn, "_attention_dir_override", None) or getattr(cfg, "attention_dir", "causal")
    if getattr(cfg, "load_in_4bit", False) or getattr(cfg, "clip_qkv", None) is not None or direction != "causal":
        return None
    grouped = isinstance(attn, GroupedQueryAttention) and not getattr(cfg, "ungroup_grouped_query_attention", False)
    per_head_input = bool(getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False))
    linear = complex_attn_linear if per_head_input else simple_attn_linear
    with_result = bool(getattr(cfg, "use_attn_result", False))

    def forward(query_input, key_input, value_input, past_kv_cache_entry=None, *args, **kwargs):
        _no_cache(past_kv_cache_entry is not None)
        W_V, b_V = (attn._W_V, attn._b_V) if grouped else (attn.W_V, attn.b_V)
        v = attn.hook_v(linear(value_input, W_V, b_V))
        z = attn.hook_z(mix(v).to(v.dtype))
        # The output projection below mirrors TL's own arithmetic so logits match bit for bit.
        if not with_result:
            w = einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)").contiguous()
            z = z.to(w.dtype)
            return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w, attn.b_O)
        w = attn.W_O[None, None]
        result = attn.hook_result((z.to(w.dtype)[..., None] * w).sum(-2))
        return result.sum(-2) + attn.b_O

    fired = {attn.hook_v, attn.hook_z} | ({attn.hook_result} if with_result else set())
    return Bypass(attn, forward, frozenset(_hook_points(attn) - fired))


# --------------------------------------------------------------------------- TL 4.x bridge
def _bridge_layout(attn) -> Optional[str]:
    """How a bridge attention class wires hook_in -> v ... o -> hook_out, or None if unknown.

    "joint": the joint-QKV family (GPT-2; rotary NeoX, Phi-3, Falcon) fires
    ``hook_hidden_states`` before ``hook_out``; "residual": BLOOM's also adds the block's
    residual inside attention; "plain": rotary/ALiBi classes that reimplement attention
    (Llama-like, MPT) and the delegating ``AttentionBridge`` (OPT, GPT-J, GPT-Neo, XGLM), whose
    Hugging Face module computes ``out_proj(pattern @ v_proj(x))``.
    """
    from transformer_lens.model_bridge.generalized_components.alibi_joint_qkv_attention import (
        ALiBiJointQKVAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.bloom_attention import BloomAttentionBridge
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
    from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
        JointQKVPositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.mpt_alibi_attention import MPTALiBiAttentionBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    layouts = {
        JointQKVAttentionBridge: "joint",
        JointQKVPositionEmbeddingsAttentionBridge: "joint",
        BloomAttentionBridge: "residual",
        PositionEmbeddingsAttentionBridge: "plain",
        ALiBiJointQKVAttentionBridge: "plain",
        MPTALiBiAttentionBridge: "plain",
        AttentionBridge: "plain",
    }
    kind = type(attn)  # exact classes only: a subclass may compute something else
    if kind not in layouts:
        return None
    if kind is AttentionBridge:
        # Delegating bridge: only where the wrapped module projects values and output through
        # the bridge's own v and o (so their hooks fire) and the pattern is not hooked inside.
        hf = attn.original_component
        if getattr(hf, "accepts_pattern_fn", False) or attn.requires_relative_position_bias or attn.is_cross_attention:
            return None
        if not (isinstance(attn._modules.get("v"), torch.nn.Module) and isinstance(attn._modules.get("o"), torch.nn.Module)):
            return None
    if getattr(attn, "_clip_qkv", None) is not None:
        return None
    return layouts[kind]


def _bridge(attn, adapter: ModelAdapter, layer: int, mix: Mixer) -> Optional[Bypass]:
    cfg = attn.config
    layout = _bridge_layout(attn)
    if layout is None or not getattr(attn, "is_causal", True):
        return None
    if any(getattr(cfg, flag, False) for flag in ("use_split_qkv_input", "use_attn_in", "use_attn_result", "gated_q_proj")):
        return None
    hf = attn.original_component
    if getattr(getattr(hf, "config", None), "clip_qkv", None) is not None or attn._modules.get("gate") is not None:
        return None
    if getattr(hf, "key_multiplier", None) is not None or getattr(attn, "_reorder_and_upcast_attn", False):
        return None
    n_kv = adapter.n_kv_heads

    def forward(*args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _no_cache(any(_cached_len(kwargs.get(k), layer) for k in ("past_key_values", "past_key_value", "layer_past")))
        hidden = attn.hook_in(hidden)
        v = attn.v(hidden)  # fires hook_v
        z: Float[Tensor, "batch pos n_heads d_head"] = mix(_heads(v, n_kv)).to(v.dtype)
        out = attn.o(z.reshape(*z.shape[:2], -1))  # fires hook_z
        if layout == "residual":
            residual = args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None
            if residual is not None:
                out = out + residual
        if layout != "plain":
            out = attn.hook_hidden_states(out)
        return attn.hook_out(out), None

    fired = {attn.hook_in, attn.hook_out} | _hook_points(attn.v) | _hook_points(attn.o)
    if layout != "plain":
        fired.add(attn.hook_hidden_states)
    return Bypass(attn, forward, frozenset(_hook_points(attn) - fired))
