"""Swap attention for uniform causal aggregation: writers that compose with every reader.

Uniform causal aggregation: query ``i`` gives ``1/m`` to each of its ``m`` valid keys
``j <= i`` (pad keys excluded, whichever side the padding is on). The ``exclude_self``
variant averages the valid keys ``j < i``; the first real position has no earlier key, so it
falls back to attending to itself (weight 1), which keeps every row a distribution.

Two ways to apply it, equal to 1e-5:

- ``method="pattern"`` writes the pattern at ``blocks.{l}.attn.hook_pattern`` (after the
  softmax; never the pre-softmax scores, which TL 4 hooks after the causal mask, so editing
  them could leak the future). Readers at ``hook_pattern`` then see the written pattern.
- ``method="fast"`` computes ``z`` as the masked running mean of the values (a cumulative
  sum over valid keys divided by their count), expanded to the query heads for grouped-query
  attention. A layer whose heads are all swapped runs a bypass forward
  (:mod:`embedwalk.mixing`): values, running mean, output projection, and no queries, keys,
  rotary, scores or softmax at all, which makes the swapped model cheaper than the plain one.
  ``hook_v``, ``hook_z`` and the attention output hooks still fire there. A layer with only
  some heads swapped, or one where another reader or writer of the run attaches to a hook of
  the skipped path (``hook_q``, ``hook_pattern``, ...), falls back to hooks: the model
  computes its own pattern, readers at ``hook_pattern`` see it, and ``hook_z`` is overwritten
  for the swapped heads.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
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


def uniform_pattern(
    mask: Bool[Tensor, "batch pos"], *, exclude_self: bool = False, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "batch q k"]:
    """The uniform causal pattern over valid keys; rows of queries with no valid key are zero
    (left padding), and with ``exclude_self`` a query with no earlier valid key attends to itself."""
    pos = mask.shape[-1]
    idx = torch.arange(pos, device=mask.device)
    causal = idx[None, :] < idx[:, None] if exclude_self else idx[None, :] <= idx[:, None]
    allowed = causal[None] & mask[:, None, :]
    if exclude_self:
        empty = ~allowed.any(-1)
        allowed = allowed | (empty[..., None] & torch.eye(pos, dtype=torch.bool, device=mask.device))
    weights = allowed.to(torch.float32)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return weights.to(dtype)


def _heads_view(x: Tensor, n: int) -> Tensor:
    # TL 4 bridges hook q/k/v/z flat ([batch, pos, heads*d_head]); TL 3 hooks them per head.
    return x.reshape(*x.shape[:2], n, -1) if x.ndim == 3 else x


def uniform_z(
    v: Float[Tensor, "batch pos kv_heads_or_flat ..."],
    mask: Bool[Tensor, "batch pos"],
    n_heads: int,
    n_kv_heads: int,
    *,
    exclude_self: bool = False,
) -> Float[Tensor, "batch pos n_heads d_head"]:
    """What ``hook_z`` would be under uniform aggregation: the masked running mean of ``v``.

    Summed in float32 (a running sum over hundreds of keys loses bits in 16-bit types) and
    returned in float32; grouped-query heads are expanded as TL and HF do (head ``h`` reads
    key-value head ``h // (n_heads // n_kv_heads)``).
    """
    v4 = _heads_view(v, n_kv_heads).to(torch.float32)
    m = mask.to(device=v.device, dtype=torch.float32)[:, :, None, None]
    total = torch.cumsum(v4 * m, dim=1)
    count = torch.cumsum(m, dim=1)
    if exclude_self:
        total, count = total - v4 * m, count - m
        first = count == 0  # no earlier valid key: the query keeps its own value
        mean = torch.where(first, v4, total / count.clamp_min(1.0))
    else:
        mean = total / count.clamp_min(1.0)
    if n_heads != n_kv_heads:
        mean = mean.repeat_interleave(n_heads // n_kv_heads, dim=2)
    return mean


class UniformSwap(Writer):
    """Replace the attention of chosen heads with uniform causal aggregation.

    ``targets``: ``"all"``, a layer, a list of layers, or ``(layer, head)`` pairs.
    ``exclude_self``: average over earlier valid keys only. ``pattern_fn``: a user pattern
    ``fn(mask, layer) -> [batch, q, k] or [batch, n_heads, q, k]`` (pattern method only; it
    may put no weight on future or pad keys). ``method``: ``"fast"`` (the running mean of the
    values; fully swapped layers are bypassed, see the module docstring) or ``"pattern"``
    (pattern written at ``hook_pattern``).
    """

    def __init__(
        self,
        targets: Targets = "all",
        *,
        exclude_self: bool = False,
        pattern_fn: Optional[PatternFn] = None,
        method: str = "fast",
    ):
        if method not in ("fast", "pattern"):
            raise EmbedwalkError(f"method must be 'fast' or 'pattern', got {method!r}")
        if pattern_fn is not None:
            if not callable(pattern_fn):
                raise EmbedwalkError(f"pattern_fn must be callable fn(mask, layer), got {type(pattern_fn).__name__}")
            if exclude_self:
                raise EmbedwalkError("exclude_self applies to the built-in uniform pattern; pass either it or pattern_fn")
            method = "pattern"  # a user pattern has no running-mean shortcut
        self.targets, self.exclude_self, self.pattern_fn, self.method = targets, exclude_self, pattern_fn, method
        self._resolved: Optional[tuple[int, dict[int, list[int]]]] = None
        self._bypassed: tuple[int, frozenset] = (0, frozenset())

    def heads(self, adapter: ModelAdapter) -> dict[int, list[int]]:
        key = id(adapter)
        if self._resolved is None or self._resolved[0] != key:
            self._resolved = (key, resolve_targets(adapter, self.targets))
        return self._resolved[1]

    def bypasses(self, adapter: ModelAdapter, *, watched, taken, ctx) -> list[Bypass]:
        def mix(v):
            return uniform_z(v, ctx().batch.mask, adapter.n_heads, adapter.n_kv_heads, exclude_self=self.exclude_self)

        out = []
        if self.method == "fast":
            for layer, heads in self.heads(adapter).items():
                if len(heads) != adapter.n_heads:
                    continue
                b = mixing_forward(adapter, layer, mix)
                if b is not None and b.module not in taken and not (b.silent & watched):
                    out.append((layer, b))
        self._bypassed = (id(adapter), frozenset(layer for layer, _ in out))
        return [b for _, b in out]

    def bypassed_layers(self, model) -> frozenset:
        """Layers of ``model`` (or its adapter) that the last run served with the bypass forward
        (no query-key path at all)."""
        key, layers = self._bypassed
        return layers if key == id(adapt(model)) else frozenset()

    def hook_points(self, adapter: ModelAdapter) -> list[str]:
        names = []
        skip = self.bypassed_layers(adapter)
        for layer in self.heads(adapter):
            if self.method == "fast":
                if layer not in skip:
                    names += [adapter.hook("v", layer), adapter.hook("z", layer)]
            else:
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
            new = uniform_z(v, ctx.batch.mask, a.n_heads, a.n_kv_heads, exclude_self=self.exclude_self)
            z = _heads_view(value, a.n_heads).clone()
            z[:, :, heads] = new[:, :, heads].to(z.dtype)
            return z.reshape(value.shape)
        pattern = self._pattern(ctx.batch.mask, layer, a.n_heads, value)
        out = value.clone()
        out[:, heads] = pattern[:, heads].to(value.dtype)
        return out

    def _pattern(self, mask: Tensor, layer: int, n_heads: int, value: Tensor) -> Tensor:
        b, _, q, k = value.shape
        if self.pattern_fn is None:
            return uniform_pattern(mask, exclude_self=self.exclude_self)[:, None].expand(b, n_heads, q, k)
        p = self.pattern_fn(mask, layer)
        if not isinstance(p, Tensor) or p.shape not in ((b, q, k), (b, n_heads, q, k)):
            raise EmbedwalkError(
                f"pattern_fn returned {getattr(p, 'shape', type(p).__name__)} at layer {layer}; expected "
                f"a tensor [batch, q, k] = {(b, q, k)} or [batch, n_heads, q, k] = {(b, n_heads, q, k)}"
            )
        p = (p[:, None] if p.ndim == 3 else p).to(device=value.device, dtype=torch.float32)
        idx = torch.arange(k, device=value.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & mask.to(value.device)[:, None, :]
        leak = (p.abs() * (~allowed)[:, None] * mask.to(value.device)[:, None, :, None]).amax()
        if leak > 1e-6:
            raise EmbedwalkError(
                f"pattern_fn at layer {layer} puts weight {float(leak):.3g} on future or pad keys; a causal "
                "pattern may only weight valid keys j <= i (use the mask it receives)"
            )
        return p.expand(b, n_heads, q, k)

    def __repr__(self) -> str:
        kind = "custom" if self.pattern_fn else ("exclude_self" if self.exclude_self else "uniform")
        return f"UniformSwap(targets={self.targets!r}, {kind}, method={self.method!r})"
