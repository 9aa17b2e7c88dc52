"""Swap attention for uniform causal aggregation: writers that compose with every reader.

Uniform causal aggregation: query ``i`` gives ``1/m`` to each of the ``m`` keys its layer's
own attention can reach, as :meth:`ModelAdapter.reach` answers it: valid keys ``j <= i``
(pad keys excluded, whichever side the padding is on) and, on a layer with a sliding window
``w`` (Mistral, Gemma-2/3's sliding layers, GPT-Neo's local layers), only ``i - j < w``.
``keys="prefix"`` ignores the window and averages over every valid ``j <= i``. The
``exclude_self`` variant averages the reachable keys ``j < i``; the first real position has
no earlier key, so it falls back to attending to itself (weight 1), which keeps every row a
distribution.

Two ways to apply it, equal to 1e-5:

- ``method="pattern"`` writes the pattern at ``blocks.{l}.attn.hook_pattern`` (after the
  softmax; never the pre-softmax scores, which TL 4 hooks after the causal mask, so editing
  them could leak the future). Readers at ``hook_pattern`` then see the written pattern.
  Some TL 4 bridge classes run the Hugging Face module first and fire ``hook_pattern``
  afterwards (OPT, GPT-Neo, GPT-J, XGLM), where an edit could never reach the output. Which
  layers behave so is found once per model by a probe
  (:func:`embedwalk.association.probes.attention_routes`), not by a list of class names;
  there the written pattern is applied exactly as attention would, ``z = pattern @ v`` at
  ``hook_z``, and the pattern seen at ``hook_pattern`` is overwritten in place with it.
- ``method="fast"`` computes ``z`` as the mean of the values over the reachable keys (the
  uniform pattern times the values, :func:`uniform_z`), expanded to the query heads for
  grouped-query attention. A layer whose heads are all swapped runs a bypass forward
  (:mod:`embedwalk.mixing`): values, their mean over the reachable keys, output projection, and no queries, keys,
  rotary, scores or softmax at all, which makes the swapped model cheaper than the plain one.
  ``hook_v``, ``hook_z`` and the attention output hooks still fire there. Each model is
  checked once (:func:`embedwalk.association.probes.bypass_exact`) that the bypass gives the
  hook route's logits; if not, the hook route serves it. A layer with only some heads
  swapped, or one where another reader or writer of the run attaches to a hook of the
  skipped path (``hook_q``, ``hook_pattern``, ...), falls back to hooks: the model computes
  its own pattern, readers at ``hook_pattern`` see it, and ``hook_z`` is overwritten for the
  swapped heads.

An edit that cannot reach the output is an error, never a warning: ``hook_v`` or ``hook_z``
that never fire, or ``hook_v`` firing after ``hook_z``, raise EmbedwalkError.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.association.probes import AttentionRoutes, attention_routes, bypass_exact
from embedwalk.mixing import Bypass, mixing_forward
from embedwalk.run import Context, Writer

__all__ = ["UniformSwap", "resolve_targets", "uniform_pattern", "uniform_z", "Targets", "PatternFn"]

Targets = Union[str, int, Sequence[int], Sequence[tuple[int, int]], None]
PatternFn = Callable[[Tensor, int], Tensor]
"""``fn(mask: Bool[batch, pos], layer) -> Float[batch, q, k]`` or ``[batch, n_heads, q, k]``."""


def resolve_targets(adapter: ModelAdapter, targets: Targets = "all") -> dict[int, list[int]]:
    """``"all"`` | a layer | layers | ``(layer, head)`` pairs  ->  ``{layer: [heads]}``."""
    everything = list(range(adapter.n_heads))
    if targets is None or (isinstance(targets, str) and targets == "all"):
        return {layer: everything for layer in range(adapter.n_layers)}
    if isinstance(targets, str):
        raise EmbedwalkError(f"targets must be 'all', layers or (layer, head) pairs; got the string {targets!r}")
    if isinstance(targets, int) and not isinstance(targets, bool):
        return {adapter.check_layer(targets): everything}
    items = list(targets) if isinstance(targets, Iterable) else None
    if not items:
        raise EmbedwalkError(
            f"targets selects no head ({targets!r}); pass 'all', a list of layers like [0, 3], or "
            "(layer, head) pairs like [(0, 1), (2, 0)]"
        )
    pairs = [isinstance(t, (tuple, list)) for t in items]
    if any(pairs) and not all(pairs):
        raise EmbedwalkError(
            f"targets mixes layers and (layer, head) pairs: {items!r}; use one form, e.g. [(0, 0), (0, 1)] "
            "for heads or [0, 1] for whole layers"
        )
    out: dict[int, set] = {}
    for t in items:
        if all(pairs):
            if len(t) != 2:
                raise EmbedwalkError(f"a head target is a (layer, head) pair; got {t!r}")
            layer, head = t
            layer = adapter.check_layer(layer)
            if not isinstance(head, int) or isinstance(head, bool) or not -adapter.n_heads <= head < adapter.n_heads:
                raise EmbedwalkError(
                    f"head {head!r} in {t!r} is out of range: layer {layer} has {adapter.n_heads} heads "
                    f"(0..{adapter.n_heads - 1})"
                )
            out.setdefault(layer, set()).add(head % adapter.n_heads)
        else:
            out.setdefault(adapter.check_layer(t), set()).update(everything)
    return {layer: sorted(heads) for layer, heads in sorted(out.items())}


def _check_reach(reach, what: str) -> Tensor:
    if not isinstance(reach, Tensor) or reach.ndim != 3 or reach.shape[-1] != reach.shape[-2]:
        raise EmbedwalkError(
            f"{what} takes reach, a [batch, query, key] boolean tensor (True where query q may attend key "
            f"k), got {getattr(reach, 'shape', type(reach).__name__)}; build it with "
            "adapt(model).reach(layer, mask) from the [batch, pos] padding mask (this argument was the "
            "mask itself before the sliding window moved into ModelAdapter.reach)"
        )
    return reach.bool()


def uniform_pattern(
    reach: Bool[Tensor, "batch q k"],
    *,
    exclude_self: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch q k"]:
    """The uniform pattern over the keys each query reaches: ``1/m`` on each of its ``m``
    reachable keys. ``reach`` is :meth:`ModelAdapter.reach` of the layer (causal, padding, the
    layer's sliding window). A row that reaches no key (a left-padding query) is zero. With
    ``exclude_self`` the query's own position is left out; a query whose only reachable key is
    itself (the first real token) keeps weight 1 on itself, so every real row stays a
    distribution. Raises EmbedwalkError when ``reach`` is not ``[batch, q, k]``.
    """
    allowed = _check_reach(reach, "uniform_pattern")
    if exclude_self:
        eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
        own = allowed & eye
        allowed = allowed & ~eye
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
    weights = allowed.to(torch.float32)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return weights.to(dtype)


def _heads_view(x: Tensor, n: int) -> Tensor:
    # TL 4 bridges hook q/k/v/z flat ([batch, pos, heads*d_head]); TL 3 hooks them per head.
    return x.reshape(*x.shape[:2], n, -1) if x.ndim == 3 else x


def _interval(reach: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``(first, count)``, each ``[batch, q]``, when every row of ``reach`` is the real keys of
    one interval ``[first, q]`` (causal attention, padding, sliding windows), so that its mean
    is a difference of running sums; None for any other shape. A real key is one its own query
    reaches (the diagonal)."""
    r8 = reach.view(torch.uint8)  # a view: bool and uint8 share the bytes
    real = reach.diagonal(dim1=-2, dim2=-1)  # [b, k]
    count = r8.sum(-1, dtype=torch.int32)
    first = r8.argmax(-1)  # the first True; 0 for a row that reaches nothing (count 0)
    if bool((reach & ~real[:, None, :]).any()) or bool(torch.triu(r8, diagonal=1).any()):
        return None  # a pad key, or a key after the query
    # every reached key is real and in [first, q]: the row is the interval iff it has them all
    cum = torch.cat([real.new_zeros(real.shape[0], 1, dtype=torch.int32), torch.cumsum(real, -1, dtype=torch.int32)], -1)
    inside = cum[:, 1:] - cum.gather(1, first)  # real keys in [first, q]
    if not torch.equal(torch.where(count > 0, inside, 0), count):
        return None
    return first, count


def uniform_z(
    v: Float[Tensor, "batch pos kv_heads_or_flat ..."],
    reach: Bool[Tensor, "batch q k"],
    n_heads: int,
    n_kv_heads: int,
    *,
    exclude_self: bool = False,
) -> Float[Tensor, "batch pos n_heads d_head"]:
    """What ``hook_z`` would be under uniform aggregation: the values averaged with
    :func:`uniform_pattern` of ``reach`` (the same keys, the same ``exclude_self`` rule),
    returned in float32.

    When every query reaches the real keys of one interval ending at itself (causal attention,
    padding, sliding windows: every ``reach`` :meth:`ModelAdapter.reach` gives today), the mean
    is a difference of running sums, O(pos) instead of the O(pos^2) pattern product; summed in
    float64 so that the difference of two long running sums keeps float32's precision. Any
    other ``reach`` (and any on MPS, which has no float64) takes the pattern product in float32. Grouped-query heads are expanded as
    TL and HF do (head ``h`` reads key-value head ``h // (n_heads // n_kv_heads)``).
    """
    reach = _check_reach(reach, "uniform_z").to(v.device)
    v4 = _heads_view(v, n_kv_heads)
    interval = _interval(reach) if v.device.type != "mps" else None  # MPS has no float64
    if interval is None:
        mean = torch.einsum("bqk,bkhd->bqhd", uniform_pattern(reach, exclude_self=exclude_self), v4.to(torch.float32))
    else:
        first, count = interval
        real = reach.diagonal(dim1=-2, dim2=-1)[:, :, None, None]
        x = v4.to(torch.float64) * real
        total = torch.cat([torch.zeros_like(x[:, :1]), torch.cumsum(x, dim=1)], dim=1)  # total[j] = sum_{k<j}
        count = count.to(torch.float64)[:, :, None, None]
        sums = total[:, 1:] - total.gather(1, first[:, :, None, None].expand(-1, -1, *x.shape[2:]))
        if exclude_self:
            only_self = real & (count == 1)  # the first real token keeps its own value
            sums, count = sums - x, count - real.to(torch.float64)
            sums, count = torch.where(only_self, x, sums), torch.where(only_self, 1.0, count)
        mean = torch.where(count > 0, sums / count.clamp_min(1.0), 0.0).to(torch.float32)  # no key: zero, as the pattern
    if n_heads != n_kv_heads:
        mean = mean.repeat_interleave(n_heads // n_kv_heads, dim=2)
    return mean


class UniformSwap(Writer):
    """Replace the attention of chosen heads with uniform causal aggregation.

    ``targets``: ``"all"``, a layer, a list of layers, or ``(layer, head)`` pairs.
    ``keys``: ``"reachable"`` (default) averages over the keys the layer's own attention can
    reach: causal, not padding, and within the layer's sliding window if it has one (Mistral,
    Gemma-2's sliding layers, GPT-Neo's local layers; see ``ModelAdapter.attention_window``);
    ``"prefix"`` averages over every valid key ``j <= i`` even beyond the window.
    ``exclude_self``: average over earlier reachable keys only. ``pattern_fn``: a user pattern
    ``fn(mask, layer) -> [batch, q, k] or [batch, n_heads, q, k]`` (pattern method only; it
    may put no weight on future or pad keys). ``method``: ``"fast"`` (the mean of the values over the
    reachable keys; fully swapped layers are bypassed, see the module docstring) or ``"pattern"``
    (the pattern written at ``hook_pattern``; on attention classes where an edit there cannot
    reach the output, ``z = pattern @ v`` is written at ``hook_z`` instead, see the module
    docstring).

    Raises EmbedwalkError for bad arguments, and at run time when the model's hooks cannot
    carry the swap (``hook_v``/``hook_z`` never fire, or ``hook_v`` fires after ``hook_z``).
    """

    def __init__(
        self,
        targets: Targets = "all",
        *,
        exclude_self: bool = False,
        pattern_fn: Optional[PatternFn] = None,
        method: str = "fast",
        keys: str = "reachable",
    ):
        if method not in ("fast", "pattern"):
            raise EmbedwalkError(f"method must be 'fast' or 'pattern', got {method!r}")
        if keys not in ("reachable", "prefix"):
            raise EmbedwalkError(
                f"keys must be 'reachable' (the keys the layer's own attention reaches, its sliding window "
                f"included) or 'prefix' (every earlier valid key), got {keys!r}"
            )
        if pattern_fn is not None:
            if not callable(pattern_fn):
                raise EmbedwalkError(f"pattern_fn must be callable fn(mask, layer), got {type(pattern_fn).__name__}")
            if exclude_self:
                raise EmbedwalkError("exclude_self applies to the built-in uniform pattern; pass either it or pattern_fn")
            method = "pattern"  # a user pattern has no running-mean shortcut
        self.targets, self.exclude_self, self.pattern_fn, self.method = targets, exclude_self, pattern_fn, method
        self.keys = keys
        self._resolved: Optional[tuple[int, dict[int, list[int]]]] = None
        self._bypassed: tuple[int, frozenset] = (0, frozenset())

    def heads(self, adapter: ModelAdapter) -> dict[int, list[int]]:
        key = id(adapter)
        if self._resolved is None or self._resolved[0] != key:
            self._resolved = (key, resolve_targets(adapter, self.targets))
        return self._resolved[1]

    def reach(self, adapter: ModelAdapter, layer: int, mask: Tensor) -> Tensor:
        """``[batch, q, k]``: the keys this swap averages over at ``layer``: the layer's own
        :meth:`ModelAdapter.reach`, or with ``keys="prefix"`` the same without its window."""
        return adapter.reach(layer, mask, window=self.keys == "reachable")

    def _mix(self, v: Tensor, mask: Tensor, adapter: ModelAdapter, layer: int) -> Tensor:
        return uniform_z(v, self.reach(adapter, layer, mask.to(v.device)), adapter.n_heads, adapter.n_kv_heads,
                         exclude_self=self.exclude_self)

    def bypasses(self, adapter: ModelAdapter, *, watched, taken, ctx) -> list[Bypass]:
        out = []
        if self.method == "fast" and bypass_exact(adapter):
            for layer, heads in self.heads(adapter).items():
                if len(heads) != adapter.n_heads:
                    continue
                b = mixing_forward(adapter, layer, lambda v, layer=layer: self._mix(v, ctx().batch.mask, adapter, layer))
                if b is not None and b.module not in taken and not (b.silent & watched):
                    out.append((layer, b))
        self._bypassed = (id(adapter), frozenset(layer for layer, _ in out))
        return [b for _, b in out]

    def bypassed_layers(self, model) -> frozenset:
        """Layers of ``model`` (or its adapter) that the last run served with the bypass forward
        (no query-key path at all)."""
        key, layers = self._bypassed
        return layers if key == id(adapt(model)) else frozenset()

    def _routes(self, adapter: ModelAdapter) -> AttentionRoutes:
        routes = attention_routes(adapter)
        for layer in self.heads(adapter):
            if not routes.v_before_z[layer]:
                raise adapter.refuse(
                    "the uniform swap", f"{adapter.hook('v', layer)} fires after {adapter.hook('z', layer)}, so "
                    "z cannot be computed from the values there"
                )
        return routes

    def _value_route(self, adapter: ModelAdapter, layer: int) -> bool:
        # The pattern method on a layer where an edit at hook_pattern never reaches z.
        return self.method == "pattern" and not attention_routes(adapter).pattern_reaches_z[layer]

    def hook_points(self, adapter: ModelAdapter) -> list[str]:
        names = []
        skip = self.bypassed_layers(adapter)
        layers = [layer for layer in self.heads(adapter) if layer not in skip]
        if not layers:
            return names
        routes = self._routes(adapter)
        for layer in layers:
            if self.method == "fast" or self._value_route(adapter, layer):
                names += [adapter.hook("v", layer), adapter.hook("z", layer)]
            if self.method == "pattern" and routes.pattern_fires[layer]:
                names.append(adapter.hook("pattern", layer))
        return names

    def _layer(self, name: str) -> int:
        return int(name.split(".")[1])

    def write(self, name: str, value: Tensor, ctx: Context) -> Tensor:
        a, layer = ctx.adapter, self._layer(name)
        heads = self.heads(a)[layer]
        if name.endswith("hook_v"):
            ctx.state[(id(self), layer)] = value
            return value
        if name.endswith("hook_z"):
            v = ctx.state.pop((id(self), layer))
            if self.method == "fast":
                new = self._mix(v, ctx.batch.mask, a, layer)
            else:  # pattern method, value route: what the attention computes from the written pattern
                b, pos = v.shape[:2]
                p = self._layer_pattern(ctx, layer, (b, a.n_heads, pos, pos), v.device)
                v4 = _heads_view(v, a.n_kv_heads).to(torch.float32).repeat_interleave(a.n_heads // a.n_kv_heads, dim=2)
                new = torch.einsum("bhqk,bkhd->bqhd", p, v4)
            z = _heads_view(value, a.n_heads).clone()
            z[:, :, heads] = new[:, :, heads].to(z.dtype)
            return z.reshape(value.shape)
        pattern = self._layer_pattern(ctx, layer, tuple(value.shape), value.device)
        if self._value_route(a, layer):
            # The module has already used its own pattern (z was written from the same pattern);
            # edit in place so readers here see what was applied, as TL discards a new tensor.
            value[:, heads] = pattern[:, heads].to(value.dtype)
            return value
        out = value.clone()
        out[:, heads] = pattern[:, heads].to(value.dtype)
        return out

    def _layer_pattern(self, ctx: Context, layer: int, shape: tuple, device) -> Tensor:
        key = (id(self), "pattern", layer)
        if key not in ctx.state:
            ctx.state[key] = self._pattern(ctx.batch.mask.to(device), layer, ctx.adapter, shape)
        return ctx.state[key]

    def _pattern(self, mask: Tensor, layer: int, adapter: ModelAdapter, shape: tuple) -> Tensor:
        b, n_heads, q, k = shape
        if self.pattern_fn is None:
            p = uniform_pattern(self.reach(adapter, layer, mask), exclude_self=self.exclude_self)
            return p[:, None].expand(b, n_heads, q, k)
        p = self.pattern_fn(mask, layer)
        if not isinstance(p, Tensor) or p.shape not in ((b, q, k), (b, n_heads, q, k)):
            raise EmbedwalkError(
                f"pattern_fn returned {getattr(p, 'shape', type(p).__name__)} at layer {layer}; expected "
                f"a tensor [batch, q, k] = {(b, q, k)} or [batch, n_heads, q, k] = {(b, n_heads, q, k)}"
            )
        p = (p[:, None] if p.ndim == 3 else p).to(device=mask.device, dtype=torch.float32)
        allowed = adapter.reach(layer, mask, window=False)  # a user pattern may look past the window
        leak = (p.abs() * (~allowed)[:, None] * mask[:, None, :, None]).amax()
        if leak > 1e-6:
            raise EmbedwalkError(
                f"pattern_fn at layer {layer} puts weight {float(leak):.3g} on future or pad keys; a causal "
                "pattern may only weight valid keys j <= i (use the mask it receives)"
            )
        return p.expand(b, n_heads, q, k)

    def __repr__(self) -> str:
        kind = "custom" if self.pattern_fn else ("exclude_self" if self.exclude_self else "uniform")
        return f"UniformSwap(targets={self.targets!r}, {kind}, method={self.method!r}, keys={self.keys!r})"
