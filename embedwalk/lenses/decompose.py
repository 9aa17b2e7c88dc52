"""The decomposition lens: the residual at one (layer, position) as an exact sum of parts.

Parts: the token embedding, the learned positional embedding (when the model has one), each
attention head's output ``z_h @ W_O[h]``, each attention output bias ``b_O``, each MLP's output
(less its output bias) and that bias. Each head's output splits further into per-source
contributions ``pattern[h, q, s] * v[s, kv(h)] @ W_O[h]``; ``v`` as hooked already carries
``b_V``, and because a pattern row sums to 1 the sources' shares of ``b_V`` add up to it.
With grouped-query attention ``hook_v`` has ``n_kv_heads`` heads; query head ``h`` reads value
head ``h // (n_heads // n_kv_heads)``. No neuron-level decomposition is ever built.

Direct logit attribution (DLA) reads each part through the final norm *with the norm's scale
frozen at its actual value for the decomposed vector*: the norm is affine once its scale is
fixed, so the parts' DLAs plus the norm's bias and the unembedding bias add up exactly to
the logit of that vector (the model's own logit at the last layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs, tokenize
from embedwalk.lenses.projection import short
from embedwalk.run import Context, Reader, run

__all__ = ["DecompositionResult", "DecompositionReader", "decompose", "frozen_final_norm"]

_STAGES = ("pre", "mid", "post")


def _nonzero(b: Optional[Tensor]) -> bool:
    return isinstance(b, Tensor) and bool((b != 0).any())


def frozen_final_norm(adapter: ModelAdapter, x: Float[Tensor, "d_model"]):
    """The final norm at ``x`` as an affine map ``y -> centre(y) * gain + bias``.

    ``gain`` is the norm's weight divided by its scale *for x*, so ``centre(x) * gain + bias``
    equals ``adapter.final_norm(x)``. The weight, bias and whether the norm centres are read off
    the model's own module by probing it (LayerNorm, RMSNorm, Gemma-style offsets and
    compatibility-mode folding all look the same from here); the scale is the ratio the module
    itself applies to ``x``. Returns ``(centre: bool, gain, bias)`` in float64.
    """
    f = lambda v: adapter.final_norm(v.to(adapter.device, adapter.dtype)).double()  # noqa: E731
    d = adapter.d_model
    zero = torch.zeros(d, dtype=torch.float64)
    bias = f(zero)
    centre = bool((f(torch.ones(d, dtype=torch.float64)) - bias).abs().max() <= 1e-4 * (1 + bias.abs().max()))
    # A zero-mean probe with no zero entries and rms 1; scaled up so eps is negligible.
    probe = torch.tensor([(-1.0) ** i for i in range(d)], dtype=torch.float64)
    if d % 2:
        probe[-3:] = torch.tensor([1.0, 1.0, -2.0])
    rms = probe.pow(2).mean().sqrt()
    c = 1e3
    weight = (f(c * probe) - bias) * rms / probe
    xd = x.double()
    u = xd - xd.mean() if centre else xd
    lin = u * weight
    out = f(xd) - bias
    scale = (lin @ lin) / (lin @ out).clamp_min(1e-300) if bool((lin != 0).any()) else torch.tensor(1.0, dtype=torch.float64)
    return centre, weight / scale, bias


@summary_repr
@dataclass
class DecompositionResult:
    """The residual at (``layer``, ``stage``, ``position``) as a sum of ``parts``.

    ``parts[i]`` has kind ``kinds[i]`` (``embed``, ``pos_embed``, ``head``, ``attn_bias``,
    ``mlp``, ``mlp_bias``), ``part_layers[i]`` and ``part_heads[i]`` (-1 where not a head).
    ``dla[i]`` is its direct logit attribution to ``token`` with the final norm's scale frozen
    at its value for ``residual``; ``norm_bias_dla`` and ``unembed_bias_dla`` complete the sum
    to ``logit``. ``source_parts[l, h, s]`` splits head ``h`` of layer ``l`` by source position.
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: list[str]
    layer: int
    stage: str
    position: int
    token: int
    token_str: str
    residual: Float[Tensor, "d_model"]
    parts: Float[Tensor, "part d_model"]
    kinds: list[str]
    part_layers: list[int]
    part_heads: list[int]
    dla: Float[Tensor, "part"]
    norm_bias_dla: float
    unembed_bias_dla: float
    logit: float
    source_parts: Optional[Float[Tensor, "layer head src d_model"]] = None
    source_dla: Optional[Float[Tensor, "layer head src"]] = None
    head_layers: list[int] = field(default_factory=list)

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        tok = self.str_tokens[self.position] if -len(self.str_tokens) <= self.position < len(self.str_tokens) else "?"
        return [f"residual at layer {self.layer} {self.stage}, position {self.position} ({tok!r}) = sum of "
                f"{len(self.kinds)} parts (relative error {self.relative_error:.1e})",
                f"logit of {self.token_str!r} = {self.logit:.4g}; largest direct logit attributions:"] + table_lines(self.top(5))

    @property
    def reconstruction(self) -> Float[Tensor, "d_model"]:
        return self.parts.double().sum(0).float()

    @property
    def relative_error(self) -> float:
        """|sum of parts - residual| / |residual|."""
        return float((self.parts.double().sum(0) - self.residual.double()).norm() / self.residual.double().norm().clamp_min(1e-30))

    @property
    def dla_total(self) -> float:
        return float(self.dla.double().sum()) + self.norm_bias_dla + self.unembed_bias_dla

    def _name(self, i: int) -> str:
        k, l, h = self.kinds[i], self.part_layers[i], self.part_heads[i]
        return {"embed": "embed", "pos_embed": "pos_embed"}.get(k) or (f"L{l}H{h}" if k == "head" else f"L{l} {k}")

    def to_dataframe(self, *, by_source: bool = False):
        """One row per part (``kind, layer, head, source_pos, source_token, norm, dla``).

        With ``by_source`` the head rows are replaced by their per-source-position rows, so in
        either form ``dla`` sums to ``logit``; the final-norm and unembedding biases are rows of
        their own (kinds ``norm_bias`` and ``unembed_bias``, norm NaN).
        """
        import pandas as pd

        nan = float("nan")
        rows = []
        norms = self.parts.norm(dim=-1)
        for i, kind in enumerate(self.kinds):
            l, h = self.part_layers[i], self.part_heads[i]
            if kind == "head" and by_source and self.source_parts is not None:
                li = self.head_layers.index(l)
                sn = self.source_parts[li, h].norm(dim=-1)
                for s in range(sn.shape[0]):
                    rows.append(dict(kind="head_source", layer=l, head=h, source_pos=s, source_token=self.str_tokens[s],
                                     norm=float(sn[s]), dla=float(self.source_dla[li, h, s])))
                continue
            src = self.position if kind in ("embed", "pos_embed") else -1
            rows.append(dict(kind=kind, layer=l, head=h, source_pos=src,
                             source_token=self.str_tokens[src] if src >= 0 else "",
                             norm=float(norms[i]), dla=float(self.dla[i])))
        rows.append(dict(kind="norm_bias", layer=-1, head=-1, source_pos=-1, source_token="", norm=nan, dla=self.norm_bias_dla))
        rows.append(dict(kind="unembed_bias", layer=-1, head=-1, source_pos=-1, source_token="", norm=nan, dla=self.unembed_bias_dla))
        return pd.DataFrame(rows)

    def layer_totals(self):
        """Per block: aggregation (attention heads + b_O) versus filtering (MLP + its bias)."""
        import pandas as pd

        layers = sorted({l for l in self.part_layers if l >= 0})
        out = []
        for l in layers:
            row = dict(layer=l)
            for name, kinds in (("aggregation", ("head", "attn_bias")), ("filtering", ("mlp", "mlp_bias"))):
                idx = [i for i, k in enumerate(self.kinds) if self.part_layers[i] == l and k in kinds]
                vec = self.parts[idx].double().sum(0) if idx else torch.zeros(self.parts.shape[1], dtype=torch.float64)
                row[f"{name}_norm"] = float(vec.norm())
                row[f"{name}_dla"] = float(self.dla[idx].double().sum()) if idx else 0.0
            out.append(row)
        return pd.DataFrame(out, columns=["layer", "aggregation_norm", "aggregation_dla", "filtering_norm", "filtering_dla"])

    def top(self, n: int = 10):
        """The ``n`` parts with the largest |DLA|."""
        df = self.to_dataframe()
        return df.reindex(df["dla"].abs().sort_values(ascending=False).index).head(n)

    def plot(self, n: int = 15):
        """Top parts by |DLA| (bars) and per-layer attention versus MLP DLA totals."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw=dict(width_ratios=[1, 1.3]))
        order = self.dla.abs().argsort(descending=True)[:n].tolist()[::-1]
        vals = [float(self.dla[i]) for i in order]
        ax1.barh(range(len(order)), vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
        ax1.set_yticks(range(len(order)), [self._name(i) for i in order], fontsize=8)
        ax1.axvline(0, color="k", lw=0.5)
        ax1.set_xlabel(f"direct logit attribution to '{short(self.token_str)}'")
        ax1.set_title(f"top {len(order)} parts (logit {self.logit:.2f})", fontsize=10)
        lt = self.layer_totals()
        x = lt["layer"].to_numpy()
        ax2.bar(x - 0.2, lt["aggregation_dla"], width=0.4, label="aggregation (attention)")
        ax2.bar(x + 0.2, lt["filtering_dla"], width=0.4, label="filtering (MLP)")
        ax2.axhline(0, color="k", lw=0.5)
        ax2.set_xlabel("layer")
        from matplotlib.ticker import MaxNLocator

        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_ylabel("DLA")
        ax2.legend(fontsize=8)
        ax2.set_title(
            f"per-layer totals; residual at {self.layer}.{self.stage}, pos {self.position} "
            f"('{short(self.str_tokens[self.position])}')", fontsize=10,
        )
        fig.tight_layout()
        return fig


class DecompositionReader(Reader):
    """Reads, at one query position of a single prompt, only what the decomposition needs.

    Per layer: the query's pattern row and the values (folded into per-source contributions
    as soon as the pattern arrives, then dropped), ``z`` at the query, and the attention and
    MLP outputs at the query.
    """

    def __init__(self, layer: int, stage: str, position: int, by_source: bool = True):
        self.layer, self.stage, self.position, self.by_source = layer, stage, position, by_source
        self.got: dict = {}

    def _layers(self, adapter: ModelAdapter) -> tuple[list[int], list[int]]:
        attn = list(range(self.layer + (0 if self.stage == "pre" else 1)))
        mlp = list(range(self.layer + (1 if self.stage == "post" else 0)))
        return attn, mlp

    def hook_points(self, adapter: ModelAdapter):
        attn, mlp = self._layers(adapter)
        names = ["hook_embed"] + (["hook_pos_embed"] if adapter.has_pos_embed else [])
        names.append(adapter.hook(f"resid_{self.stage}", self.layer))
        for l in attn:
            names += [adapter.hook("z", l), adapter.hook("attn_out", l)]
            if self.by_source:
                names += [adapter.hook("v", l), adapter.hook("pattern", l)]
        names += [adapter.hook("mlp_out", l) for l in mlp]
        return names

    def start(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.names = {}
        for l in range(adapter.n_layers):
            for kind in ("z", "attn_out", "v", "pattern", "mlp_out"):
                self.names[adapter.hook(kind, l)] = (kind, l)
        self.names[adapter.hook(f"resid_{self.stage}", self.layer)] = ("resid", self.layer)
        self.names["hook_embed"] = ("embed", -1)
        self.names["hook_pos_embed"] = ("pos_embed", -1)

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        kind, l = self.names[name]
        q = self.position
        a = self.adapter
        if kind in ("v", "z") and value.ndim == 3:  # the bridge's hooks see heads flattened
            value = value.reshape(*value.shape[:2], -1, a.d_head)
        if kind == "v":
            self.got[("v", l)] = value[0]
        elif kind == "pattern":
            v = self.got.pop(("v", l)).float()
            v = v.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)  # [src, n_heads, d_head]
            pat = value[0, :, q, : q + 1].float()  # causal: sources after q have zero weight
            W_O = a.W_O(l).detach().float()
            self.got[("src", l)] = torch.einsum("hs,shd,hdm->hsm", pat, v[: q + 1], W_O).cpu()
        elif kind == "z":
            self.got[("head", l)] = torch.einsum("hd,hdm->hm", value[0, q].float(), a.W_O(l).detach().float()).cpu()
        else:
            self.got[(kind, l)] = value[0, q].float().cpu()

    def result(self):
        return self.got


def _bias(module, name: str) -> Optional[Tensor]:
    try:
        b = getattr(module, name)
    except AttributeError:
        return None
    return b.detach().float().cpu() if isinstance(b, Tensor) else None


def decompose(
    model,
    inputs: Inputs,
    *,
    layer: int = -1,
    position: int = -1,
    token=None,
    stage: str = "post",
    by_source: bool = True,
    attention_mask: Optional[Tensor] = None,
    prepend_bos: Optional[bool] = None,
) -> DecompositionResult:
    """Decompose the residual of one prompt at ``layer``/``position`` exactly into its parts.

    ``stage`` picks ``resid_pre``, ``resid_mid`` or ``resid_post`` (default) of ``layer``.
    ``token`` (an id or a one-token string) is what the DLA is computed for; by default the
    model's own top prediction at that position. The DLA uses the final norm with its scale
    frozen at the actual value for the decomposed vector, so the parts' DLAs, plus the norm
    bias and unembedding bias rows, sum to the logit that the final norm and unembedding give
    that vector (at the last layer's ``post``: the model's own logit).
    """
    a = adapt(model)
    if stage not in _STAGES:
        raise EmbedwalkError(f"stage must be one of {_STAGES}, got {stage!r}")
    layer = a.check_layer(layer)
    tokens, mask = tokenize(a, inputs, attention_mask, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise EmbedwalkError(
            f"decompose reads one prompt at a time; got {tokens.shape[0]}. Pass a single string "
            "or a [1, pos] token tensor, and loop over prompts"
        )
    tokens = tokens[:, mask[0]]  # a lone prompt needs no padding
    n = tokens.shape[1]
    if not isinstance(position, int) or isinstance(position, bool) or not -n <= position < n:
        raise EmbedwalkError(f"position {position!r} is out of range: the prompt has {n} tokens (valid: 0..{n - 1}, or negative from the end)")
    position %= n
    reader = DecompositionReader(layer, stage, position, by_source)
    final_logits = []
    (got,) = run(model, tokens, readers=[reader], on_logits=lambda lg, ctx: final_logits.append(lg[0, position].detach()))
    token_id = int(final_logits[0].argmax()) if token is None else a.token_id(token)

    attn_layers, mlp_layers = reader._layers(a)
    parts, kinds, pl, ph = [], [], [], []

    def add(vec, kind, l=-1, h=-1):
        parts.append(vec)
        kinds.append(kind)
        pl.append(l)
        ph.append(h)

    add(got[("embed", -1)], "embed")
    if a.has_pos_embed:
        add(got[("pos_embed", -1)], "pos_embed")
    for l in range(layer + 1):
        if l in attn_layers:
            heads = got[("head", l)]
            for h in range(a.n_heads):
                add(heads[h], "head", l, h)
            b_O = a.b_O(l)
            if b_O is not None:
                b_O = b_O.detach().float().cpu()
            else:  # no b_O to read: whatever hook_attn_out adds beyond the heads stands in for it
                b_O = got[("attn_out", l)] - heads.double().sum(0).float()
                if float(b_O.norm()) <= 1e-6 * float(heads.norm()):
                    b_O = None
            if _nonzero(b_O):
                add(b_O, "attn_bias", l)
        if l in mlp_layers:
            b_out = _bias(a.model.blocks[l].mlp, "b_out")
            mlp = got[("mlp_out", l)]
            if _nonzero(b_out) and b_out.shape == mlp.shape:
                add(mlp - b_out, "mlp", l)
                add(b_out, "mlp_bias", l)
            else:
                add(mlp, "mlp", l)
    P = torch.stack(parts)
    x = got[("resid", layer)]

    with torch.no_grad():
        centre, gain, nbias = frozen_final_norm(a, x)
        w_u = a.W_U[:, token_id].detach().double().cpu()
        Pd = P.double()
        if centre:
            Pd = Pd - Pd.mean(-1, keepdim=True)
        dla = ((Pd * gain) @ w_u).float()
        b_U = a.b_U
        ub = float(b_U[token_id]) if b_U is not None else 0.0
        logit = float(a.readout(x.to(a.device, a.dtype))[token_id])
        src = src_dla = None
        if by_source and attn_layers:
            src = torch.stack([got[("src", l)] for l in attn_layers])  # [layer, head, src, d]
            S = src.double()
            if centre:
                S = S - S.mean(-1, keepdim=True)
            src_dla = ((S * gain) @ w_u).float()
    return DecompositionResult(
        tokens=tokens[0], str_tokens=a.to_str_tokens(tokens[0]), layer=layer, stage=stage, position=position,
        token=token_id, token_str=a.to_str_tokens([token_id])[0], residual=x, parts=P, kinds=kinds,
        part_layers=pl, part_heads=ph, dla=dla, norm_bias_dla=float(nbias @ w_u), unembed_bias_dla=ub,
        logit=logit, source_parts=src, source_dla=src_dla, head_layers=list(attn_layers),
    )
