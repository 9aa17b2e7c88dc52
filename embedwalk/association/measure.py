"""What attention adds over uniform aggregation: per-head distances, self bias, downstream effects.

- ``association_bias``: one pass; per layer and head, how far the head's output ``z`` is from
  the uniform output (the running mean of its values), and the attention each query pays to
  its own position against the uniform expectation ``1/m``.
- ``downstream``: an original and a swapped pass (two forwards); next-token loss change,
  KL(original || swapped), top-1 agreement and the cosine of the composite vectors.
- ``sweep``: ``downstream`` one layer at a time and one head at a time, reusing the original
  pass's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs, tokenize
from embedwalk.run import Context, Reader, run
from embedwalk.association.probes import value_offset
from embedwalk.association.swap import Targets, UniformSwap, _heads_view, _reachable, uniform_z

__all__ = [
    "AssociationReader", "AssociationBias", "association_bias", "SwapEffect", "downstream",
    "SweepResult", "sweep",
]


# --------------------------------------------------------------------------- one pass
class AssociationReader(Reader):
    """Per head: mean over valid queries of ‖z − z_uniform‖/‖z − c‖, cos(z − c, z_uniform − c),
    and the attention to the query's own position next to the uniform expectation 1/m.

    ``c`` is the head's value offset (:func:`embedwalk.association.probes.value_offset`): the
    constant part of its values, which TransformerLens weight processing (``fold_ln``,
    ``fold_value_biases``) moves into ``b_O``. Any stochastic pattern passes it through
    unchanged, so ``z − c`` and ``z_uniform − c`` are the same on a raw and a processed model,
    and so are the measures. ``keys``: as for :class:`UniformSwap` (``"reachable"``: the
    uniform mean and ``m`` count the keys within the layer's sliding window).
    """

    def __init__(self, *, exclude_self: bool = False, keys: str = "reachable"):
        self.swap = UniformSwap(exclude_self=exclude_self, keys=keys)  # validates; owns the windows
        self.exclude_self = exclude_self

    def hook_points(self, adapter):
        return [adapter.hook(k, l) for l in range(adapter.n_layers) for k in ("v", "z", "pattern")]

    def start(self, adapter):
        L, H = adapter.n_layers, adapter.n_heads
        zeros = lambda: torch.zeros(L, H, dtype=torch.float64, device=adapter.device)  # noqa: E731
        self.dist, self.cos, self.self_attn = zeros(), zeros(), zeros()
        self.self_uniform = torch.zeros((), dtype=torch.float64, device=adapter.device)
        self.self_uniform_layer = torch.zeros(L, dtype=torch.float64, device=adapter.device)
        self.n_tokens = 0
        self.adapter = adapter
        offset = value_offset(adapter).to(adapter.device)  # [layer, kv_heads, d_head]
        self.offset = offset.repeat_interleave(H // adapter.n_kv_heads, dim=1)  # [layer, heads, d_head]
        self.windows = [self.swap.window(adapter, l) for l in range(L)]

    def read(self, name, value, ctx: Context):
        a, layer = ctx.adapter, int(name.split(".")[1])
        mask = ctx.batch.mask.to(value.device)
        window = self.windows[layer]
        if name.endswith("hook_v"):
            ctx.state[(id(self), layer)] = value
        elif name.endswith("hook_z"):
            v = ctx.state.pop((id(self), layer))
            zu = uniform_z(v, mask, a.n_heads, a.n_kv_heads, exclude_self=self.exclude_self, window=window)
            z = _heads_view(value, a.n_heads).to(torch.float32)
            c = self.offset[layer].to(z.device)
            z0, zu0 = z - c, zu - c
            dist = (z - zu).norm(dim=-1) / z0.norm(dim=-1).clamp_min(1e-12)
            cos = F.cosine_similarity(z0, zu0, dim=-1, eps=1e-12)
            self.dist[layer] += dist[mask].sum(0).double()
            self.cos[layer] += cos[mask].sum(0).double()
        else:  # pattern [batch, head, q, k]
            diag = value.diagonal(dim1=-2, dim2=-1).to(torch.float32)  # [batch, head, pos]
            self.self_attn[layer] += diag.permute(0, 2, 1)[mask].sum(0).double()
            m = _reachable(mask, False, window).sum(-1).to(torch.float64)  # [batch, q]
            self.self_uniform_layer[layer] += (1.0 / m[mask]).sum()
            if layer == 0:
                full = torch.cumsum(mask.to(torch.float64), dim=-1)
                self.self_uniform += (1.0 / full[mask]).sum()
                self.n_tokens += int(mask.sum())

    def result(self) -> "AssociationBias":
        n = max(self.n_tokens, 1)
        return AssociationBias(
            distance=(self.dist / n).float().cpu(),
            cosine=(self.cos / n).float().cpu(),
            self_attention=(self.self_attn / n).float().cpu(),
            self_uniform=float(self.self_uniform / n),
            n_tokens=self.n_tokens,
            self_uniform_by_layer=(self.self_uniform_layer / n).float().cpu(),
        )


@summary_repr
@dataclass
class AssociationBias:
    """Per layer and head, averaged over valid query positions.

    ``distance``: ‖z − z_uniform‖/‖z − c‖; ``cosine``: cos(z − c, z_uniform − c), where ``c``
    is the head's value offset (its values at a zero block input: value bias plus norm bias
    through ``W_V``), so that both are the same with and without TransformerLens weight
    processing; for a model without biases ``c = 0``. ``z_uniform`` averages the values over
    the keys the layer reaches (its sliding window included, unless ``keys="prefix"``).
    ``self_attention``: the weight a query gives its own position; ``self_uniform``: the
    uniform expectation over the whole causal prefix, the mean of 1/m (m = valid keys ≤ i);
    ``self_uniform_by_layer``: the same over each layer's reachable keys (equal to
    ``self_uniform`` on a layer without a window). ``self_bias = self_attention −
    self_uniform_by_layer``: negative means heads avoid their own position more than uniform
    aggregation would.
    """

    distance: Float[Tensor, "layer head"]
    cosine: Float[Tensor, "layer head"]
    self_attention: Float[Tensor, "layer head"]
    self_uniform: float
    n_tokens: int
    self_uniform_by_layer: Optional[Float[Tensor, "layer"]] = None

    def _headline(self) -> list[str]:
        L, Hh = self.distance.shape
        return [f"{L} layers x {Hh} heads over {self.n_tokens} tokens: distance to uniform mean "
                f"{float(self.distance.mean()):.3f}, cosine mean {float(self.cosine.mean()):.3f}, self-attention mean "
                f"{float(self.self_attention.mean()):.3f} (uniform {self.self_uniform:.3f})"]

    @property
    def self_bias(self) -> Float[Tensor, "layer head"]:
        if self.self_uniform_by_layer is None:
            return self.self_attention - self.self_uniform
        return self.self_attention - self.self_uniform_by_layer[:, None]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        L, H = self.distance.shape
        for name, t in (("distance", self.distance), ("cosine", self.cosine),
                        ("self_attention", self.self_attention), ("self_bias", self.self_bias)):
            for l in range(L):
                for h in range(H):
                    rows.append({"layer": l, "head": h, "metric": name, "value": float(t[l, h])})
        return pd.DataFrame(rows)

    def plot(self):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
        from embedwalk.figures import log_norm, plain_ticks

        d = self.distance.double().numpy()
        im = axes[0].imshow(d, aspect="auto", cmap="viridis", norm=log_norm(d))  # a few heads reach 10x the rest
        axes[0].set(title="‖z − z_uniform‖ / ‖z‖", xlabel="head", ylabel="layer")
        plain_ticks(fig.colorbar(im, ax=axes[0], label="relative distance to uniform aggregation (log scale)"))
        lim = float(self.self_bias.abs().max()) or 1.0
        im = axes[1].imshow(self.self_bias.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1].set(title=f"self bias (attention to self − {self.self_uniform:.3f})", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=axes[1], label="attention weight on own position − uniform (< 0: avoids self)")
        return fig


def association_bias(
    model,
    inputs: Inputs,
    *,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    keys: str = "reachable",
    batch_size: int = 8,
    **run_kwargs,
) -> AssociationBias:
    """How far each head's output is from uniform aggregation, and its self bias, on ``inputs``.

    See :class:`AssociationReader` and :class:`AssociationBias` for the definitions: the
    measures are invariant to TransformerLens weight processing (raw bridge, compatibility
    mode and a processed HookedTransformer give the same numbers), and ``keys`` chooses
    between the keys each layer reaches (default) and the whole causal prefix.
    """
    (res,) = run(model, inputs, readers=[AssociationReader(exclude_self=exclude_self, keys=keys)],
                 attention_mask=attention_mask, batch_size=batch_size, **run_kwargs)
    return res


# --------------------------------------------------------------------------- downstream
class _Final(Reader):
    """Puts the final residual (the composite vector) at each valid position on the batch's record."""

    def __init__(self, out: list):
        self.out = out

    def hook_points(self, adapter):
        return [adapter.final_resid_hook]

    def read(self, name, value, ctx):
        ctx.state["ew_final"] = value[ctx.batch.mask.to(value.device)].to(torch.float32)

    def end_batch(self, ctx):  # on_logits has already appended this batch's record
        self.out[-1].final = ctx.state.pop("ew_final")


@dataclass
class _Pass:
    logp: Tensor  # [n_valid, vocab] float32
    nll: Tensor  # [n_pred] next-token loss at positions whose next token is real
    final: Tensor  # [n_valid, d_model]


def _passes(adapter, tokens, mask, writers, batch_size) -> list[_Pass]:
    out: list[_Pass] = []

    def on_logits(logits, ctx):
        m = ctx.batch.mask.to(logits.device)
        logp = logits.to(torch.float32).log_softmax(-1)
        has_next = m[:, :-1] & m[:, 1:]
        target = ctx.batch.tokens.to(logits.device)[:, 1:]
        nll = -logp[:, :-1].gather(-1, target[..., None])[..., 0][has_next]
        out.append(_Pass(logp[m], nll, None))

    run(adapter.model, tokens, attention_mask=mask, readers=[_Final(out)], writers=writers,
        batch_size=batch_size, progress=False, on_logits=on_logits)
    return out


@summary_repr
@dataclass
class SwapEffect:
    """What swapping ``targets`` for uniform aggregation did to the model's predictions."""

    targets: object
    loss_original: float
    loss_swapped: float
    kl: float  # mean over valid positions of KL(original || swapped), nats
    top1_agreement: float
    composite_cosine: float  # mean over valid positions of cos(final residual original, swapped)
    n_tokens: int

    @property
    def delta_loss(self) -> float:
        return self.loss_swapped - self.loss_original

    def as_row(self) -> dict:
        return {"loss_original": self.loss_original, "loss_swapped": self.loss_swapped,
                "delta_loss": self.delta_loss, "kl": self.kl, "top1_agreement": self.top1_agreement,
                "composite_cosine": self.composite_cosine, "n_tokens": self.n_tokens}

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"targets": str(self.targets), "metric": k, "value": v} for k, v in self.as_row().items()])

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
        row = self.as_row()
        keys = ["delta_loss", "kl", "top1_agreement", "composite_cosine"]
        ax.bar(keys, [row[k] for k in keys])
        ax.set_title(f"uniform swap of {self.targets}")
        return fig


def _compare(targets, orig: list[_Pass], swapped: list[_Pass]) -> SwapEffect:
    nll_o = torch.cat([p.nll for p in orig]).double()
    nll_s = torch.cat([p.nll for p in swapped]).double()
    kl = agree = cos = 0.0
    n = 0
    for o, s in zip(orig, swapped):
        kl += float((o.logp.exp() * (o.logp - s.logp)).sum(-1).double().sum())
        agree += float((o.logp.argmax(-1) == s.logp.argmax(-1)).sum())
        cos += float(F.cosine_similarity(o.final, s.final, dim=-1).double().sum())
        n += o.logp.shape[0]
    if nll_o.numel() == 0:
        raise EmbedwalkError("the text has no next-token pairs: pass prompts of at least two tokens")
    return SwapEffect(targets, float(nll_o.mean()), float(nll_s.mean()), kl / n, agree / n, cos / n, n)


def _prepare(model, inputs, attention_mask, prepend_bos, padding_side):
    adapter = adapt(model)
    tokens, mask = tokenize(adapter, inputs, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
    return adapter, tokens, mask


def downstream(
    model,
    inputs: Inputs,
    targets: Targets = "all",
    *,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    method: str = "fast",
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
) -> SwapEffect:
    """Swap ``targets`` (all / layers / (layer, head) pairs) and compare with the original model."""
    adapter, tokens, mask = _prepare(model, inputs, attention_mask, prepend_bos, padding_side)
    swap = UniformSwap(targets, exclude_self=exclude_self, method=method)
    swap.heads(adapter)  # validate before spending a forward pass
    orig = _passes(adapter, tokens, mask, [], batch_size)
    return _compare(targets, orig, _passes(adapter, tokens, mask, [swap], batch_size))


@summary_repr
@dataclass
class SweepResult:
    """One row per swap: ``unit`` is 'all', 'layer' or 'head'."""

    effects: list[SwapEffect] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    n_layers: int = 0
    n_heads: int = 0

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        if not self.effects:
            return ["no swaps"]
        df = self.table
        counts = df.unit.value_counts().to_dict()
        return [f"{len(df)} swaps ({', '.join(f'{v} {k}' for k, v in counts.items())}) on {self.n_layers} layers x {self.n_heads} heads; "
                "largest KL first:"] + table_lines(df.sort_values("kl", ascending=False), max_rows=8)

    @property
    def table(self):
        import pandas as pd

        rows = []
        for unit, e in zip(self.units, self.effects):
            layer = head = None
            if unit == "layer":
                layer = e.targets[0]
            elif unit == "head":
                layer, head = e.targets[0]
            rows.append({"unit": unit, "layer": layer, "head": head, **e.as_row()})
        return pd.DataFrame(rows)

    def head_matrix(self, metric: str = "delta_loss") -> Float[Tensor, "layer head"]:
        out = torch.full((self.n_layers, self.n_heads), float("nan"))
        for unit, e in zip(self.units, self.effects):
            if unit == "head":
                l, h = e.targets[0]
                out[l, h] = e.as_row()[metric]
        return out

    def to_dataframe(self):
        return self.table.melt(id_vars=["unit", "layer", "head"], var_name="metric", value_name="value")

    def plot(self, metric: str = "delta_loss"):
        import matplotlib.pyplot as plt

        t = self.table
        layers = t[t.unit == "layer"]
        heads = self.head_matrix(metric)
        has_heads = not torch.isnan(heads).all()
        fig, axes = plt.subplots(1, 1 + has_heads, figsize=(5 + 5 * has_heads, 4.5), constrained_layout=True, squeeze=False)
        ax = axes[0, 0]
        ax.bar(layers.layer, layers[metric])
        ax.set(title=f"{metric}: one layer swapped", xlabel="layer", ylabel=_SWEEP_UNITS.get(metric, metric))
        if has_heads:
            im = axes[0, 1].imshow(heads.numpy(), aspect="auto", cmap="magma")
            axes[0, 1].set(title=f"{metric}: one head swapped", xlabel="head", ylabel="layer")
            fig.colorbar(im, ax=axes[0, 1], label=_SWEEP_UNITS.get(metric, metric))
        return fig


_SWEEP_UNITS = {
    "delta_loss": "Δ loss, swapped − original [nats/token]",
    "kl": "KL(original ‖ swapped) [nats]",
    "top1_agreement": "top-1 agreement with the original (fraction)",
    "composite_cosine": "cosine of final residuals (original, swapped)",
}


def sweep(
    model,
    inputs: Inputs,
    *,
    units: Sequence[str] = ("all", "layer", "head"),
    layers: Optional[Sequence[int]] = None,
    attention_mask: Optional[Tensor] = None,
    exclude_self: bool = False,
    method: str = "fast",
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: bool = False,
) -> SweepResult:
    """Swap all heads, then each layer, then each head, one at a time; one original pass."""
    bad = set(units) - {"all", "layer", "head"}
    if bad or not units:
        raise EmbedwalkError(f"units must be chosen from 'all', 'layer', 'head'; got {list(units)!r}")
    adapter, tokens, mask = _prepare(model, inputs, attention_mask, prepend_bos, padding_side)
    chosen = [adapter.check_layer(l) for l in (layers if layers is not None else range(adapter.n_layers))]
    jobs: list[tuple[str, object]] = []
    if "all" in units:
        jobs.append(("all", "all"))
    if "layer" in units:
        jobs += [("layer", [l]) for l in chosen]
    if "head" in units:
        jobs += [("head", [(l, h)]) for l in chosen for h in range(adapter.n_heads)]
    orig = _passes(adapter, tokens, mask, [], batch_size)
    result = SweepResult(n_layers=adapter.n_layers, n_heads=adapter.n_heads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="swap sweep")
    for unit, targets in jobs:
        swap = UniformSwap(targets, exclude_self=exclude_self, method=method)
        result.effects.append(_compare(targets, orig, _passes(adapter, tokens, mask, [swap], batch_size)))
        result.units.append(unit)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return result
