"""The decomposition lens: the residual at one (layer, position) as an exact sum of parts.

Parts: the token embedding, the positional embedding (when the model adds one), each
attention head's output ``z_h @ W_O[h]``, each attention output bias ``b_O``, each MLP's output
(less its output bias) and that bias. Where a block normalises a sublayer's output before
adding it (Gemma-2/3, OLMo-2) each head and ``b_O`` are read through that post-norm with its
scale frozen at its actual value for the attention output at the decomposed position, so the
parts are the heads' real contributions and add up exactly; a post-norm bias is a part of its
own (``attn_norm_bias``), and a residual multiplier (Granite) scales every part of the block.
MLPs with a post-norm or multiplier are one part (their bias cannot be split off exactly). Each head's output splits further into per-source
contributions ``pattern[h, q, s] * v[s, kv(h)] @ W_O[h]``; ``v`` as hooked already carries
``b_V``, and because a pattern row sums to 1 the sources' shares of ``b_V`` add up to it.
With grouped-query attention ``hook_v`` has ``n_kv_heads`` heads; query head ``h`` reads value
head ``h // (n_heads // n_kv_heads)``. No neuron-level decomposition is ever built.

Direct logit attribution (DLA) reads each part through the final norm *with the norm's scale
frozen at its actual value for the decomposed vector*: the norm is affine once its scale is
fixed, so the parts' DLAs plus the norm's bias and the unembedding bias add up exactly to
the logit of that vector (the model's own logit at the last layer). A linear output transform
(Granite's ``logits_scaling``, Cohere's ``logit_scale``) scales every DLA; a soft-cap
(Gemma-2) is not linear, so there the DLAs add up to the logit *before* the cap
(``pre_transform_logit``), and ``logit`` is the capped one the model outputs.

"Exact" means: in float32/float64 models the parts sum to the residual and the DLAs to the
logit up to float32 rounding of the parts (relative 1e-6 .. 1e-5). In bfloat16/float16 models
the parts are still formed and summed in float32 or better (float64 sums), but the model
itself rounds its residual stream to 16 bits after every block and its logit to 16 bits, so
the parts sum to the stored residual only to the model's own rounding (about 2^-8 relative
per addition for bfloat16). The result reports what is left: ``residual_gap`` (relative) and
``logit_gap`` (the logit minus the sum of DLAs, a ``rounding`` row of the dataframe).
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
from embedwalk.inputs import Inputs, tokenize, warn_if_spaced_likelier
from embedwalk.run import Context, Reader, run

__all__ = ["DecompositionResult", "DecompositionReader", "decompose", "frozen_final_norm"]

_STAGES = ("pre", "mid", "post")


def _nonzero(b: Optional[Tensor]) -> bool:
    return isinstance(b, Tensor) and bool((b != 0).any())


def frozen_final_norm(adapter: ModelAdapter, x: Float[Tensor, "d_model"]):
    """The final norm at ``x`` as an affine map; see :func:`frozen_norm`."""
    return frozen_norm(adapter.final_norm, x, adapter)


def _module_norm(adapter: ModelAdapter, module):
    def f(v):
        return module(v.reshape(1, -1, v.shape[-1])).reshape(v.shape)
    return f


def frozen_norm(norm, x: Float[Tensor, "d_model"], adapter: ModelAdapter):
    """The norm ``norm`` (a callable on ``[..., d_model]``) at ``x`` as an affine map
    ``y -> centre(y) * gain + bias``.

    ``gain`` is the norm's weight divided by its scale *for x*, so ``centre(x) * gain + bias``
    equals ``norm(x)``. The weight, bias and whether the norm centres are read off
    the model's own module by probing it (LayerNorm, RMSNorm, Gemma-style offsets and
    compatibility-mode folding all look the same from here); the scale is the ratio the module
    itself applies to ``x``. Returns ``(centre: bool, gain, bias)`` in float64.
    """
    # 16-bit models: probe in float32, so that modules computing in the input's dtype (TL 4
    # bridges) give the norm's weight unrounded; TL 3 norms round to the model dtype themselves.
    wide = torch.float32 if adapter.dtype in (torch.bfloat16, torch.float16) else adapter.dtype
    f = lambda v: norm(v.to(adapter.device, wide)).double()  # noqa: E731
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
    ``attn_norm_bias``, ``mlp``, ``mlp_bias``), ``part_layers[i]`` and ``part_heads[i]`` (-1
    where not a head). ``dla[i]`` is its direct logit attribution to ``token`` with the final
    norm's scale frozen at its value for ``residual`` (times a linear output scale);
    ``norm_bias_dla`` and ``unembed_bias_dla`` complete the sum to ``pre_transform_logit``,
    which equals ``logit`` (up to ``logit_gap``) unless the model soft-caps its logits. ``source_parts[l, h, s]`` splits head ``h`` of layer ``l`` by source position.
    ``residual_gap`` = |residual - sum of parts| / |residual| and ``logit_gap`` = logit - sum of
    DLAs: the model's own rounding, about 1e-6 in float32 and 1e-3 in bfloat16 (see the module
    docstring for what "exact" means per dtype).
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
    pre_transform_logit: float
    source_parts: Optional[Float[Tensor, "layer head src d_model"]] = None
    source_dla: Optional[Float[Tensor, "layer head src"]] = None
    head_layers: list[int] = field(default_factory=list)
    residual_gap: float = 0.0
    logit_gap: float = 0.0
    dtype: str = "float32"

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
        """Sum of all DLAs: ``pre_transform_logit`` (= ``logit`` without a soft-cap)."""
        return float(self.dla.double().sum()) + self.norm_bias_dla + self.unembed_bias_dla

    def _name(self, i: int) -> str:
        k, l, h = self.kinds[i], self.part_layers[i], self.part_heads[i]
        return {"embed": "embed", "pos_embed": "pos_embed"}.get(k) or (f"L{l}H{h}" if k == "head" else f"L{l} {k}")

    def to_dataframe(self, *, by_source: bool = False):
        """One row per part (``kind, layer, head, source_pos, source_token, norm, dla``).

        With ``by_source`` the head rows are replaced by their per-source-position rows, so in
        either form ``dla`` sums to ``logit``; the final-norm and unembedding biases are rows of
        their own (kinds ``norm_bias`` and ``unembed_bias``, norm NaN), and so is what the
        model's own rounding leaves (kind ``rounding``: ``dla`` = ``logit_gap``, ``norm`` =
        |residual - sum of parts|).
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
        rows.append(dict(kind="rounding", layer=-1, head=-1, source_pos=-1, source_token="",
                         norm=self.residual_gap * float(self.residual.double().norm()), dla=self.logit_gap))
        return pd.DataFrame(rows)

    def layer_totals(self):
        """Per block: aggregation (attention heads + b_O) versus filtering (MLP + its bias)."""
        import pandas as pd

        layers = sorted({l for l in self.part_layers if l >= 0})
        out = []
        for l in layers:
            row = dict(layer=l)
            for name, kinds in (("aggregation", ("head", "attn_bias", "attn_norm_bias")), ("filtering", ("mlp", "mlp_bias"))):
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

        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator

        from embedwalk.figures import visible_token

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw=dict(width_ratios=[1, 1.3]),
                                       constrained_layout=True)
        target = visible_token(self.token_str, 16)
        order = self.dla.abs().argsort(descending=True)[:n].tolist()[::-1]
        vals = [float(self.dla[i]) for i in order]
        ax1.barh(range(len(order)), vals, color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
        ax1.set_yticks(range(len(order)), [self._name(i) for i in order], fontsize=8)
        ax1.axvline(0, color="k", lw=0.5)
        ax1.set_xlabel(f"direct logit attribution to '{target}' (logits)")
        ax1.set_title(f"top {len(order)} parts by |DLA| (logit of '{target}' {self.logit:.2f})", fontsize=10)
        ax1.legend(handles=[Patch(color="tab:blue", label="raises the logit"), Patch(color="tab:red", label="lowers it")],
                   fontsize=8, loc="lower right" if sum(v < 0 for v in vals) * 2 < len(vals) else "lower left")
        lt = self.layer_totals()
        x = lt["layer"].to_numpy()
        ax2.bar(x - 0.2, lt["aggregation_dla"], width=0.4, label="aggregation (attention heads + b_O)")
        ax2.bar(x + 0.2, lt["filtering_dla"], width=0.4, label="filtering (MLP)")
        ax2.axhline(0, color="k", lw=0.5)
        ax2.set_xlabel("layer")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_ylabel(f"DLA to '{target}' (logits)")
        ax2.legend(fontsize=8)
        ax2.set_title(
            f"per-layer totals; residual at {self.layer}.{self.stage}, pos {self.position} "
            f"('{visible_token(self.str_tokens[self.position], 16)}')", fontsize=10,
        )
        return fig


class DecompositionReader(Reader):
    """Reads, at one query position of a single prompt, only what the decomposition needs.

    Per layer: the query's pattern row and the values (folded into per-source contributions
    as soon as the pattern arrives, then dropped), ``z`` at the query, and the MLP output at
    the query.
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
            names.append(adapter.hook("z", l))
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


@dataclass
class _SublayerMap:
    """``v -> centre(v) * gain + bias`` (the frozen post-norm), times the residual scale;
    ``apply`` maps the linear part only, ``bias`` is the norm's own bias (or None)."""

    centre: bool
    gain: Optional[Tensor]
    bias: Optional[Tensor]

    def apply(self, v: Tensor) -> Tensor:
        if self.gain is None:
            return v
        vd = v.double()
        if self.centre:
            vd = vd - vd.mean(-1, keepdim=True)
        return (vd * self.gain).float()


def _sublayer_map(a: ModelAdapter, post_norm, scale: float, output: Tensor) -> _SublayerMap:
    if post_norm is None:
        if scale == 1.0:
            return _SublayerMap(False, None, None)
        return _SublayerMap(False, torch.full((a.d_model,), scale, dtype=torch.float64), None)
    centre, gain, nbias = frozen_norm(_module_norm(a, post_norm), output, a)
    bias = (nbias * scale).float() if _nonzero(nbias) else None
    return _SublayerMap(centre, gain * scale, bias)


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
    progress: Optional[bool] = None,
) -> DecompositionResult:
    """Decompose the residual of one prompt at ``layer``/``position`` exactly into its parts.

    ``stage`` picks ``resid_pre``, ``resid_mid`` or ``resid_post`` (default) of ``layer``.
    ``token`` (an id or a one-token string) is what the DLA is computed for; by default the
    model's own top prediction at that position. The DLA uses the final norm with its scale
    frozen at the actual value for the decomposed vector, so the parts' DLAs, plus the norm
    bias and unembedding bias rows, sum to the logit that the model's readout gives that
    vector (at the last layer's ``post``: the model's own logit; before a soft-cap, see the
    module docstring).

    ``progress``: None shows a bar with an ETA once the call has run 5 s
    (:func:`embedwalk.progress.show_after`), True at once, False never.

    Raises :class:`~embedwalk.errors.ArchitectureError` for ``stage="mid"`` on a parallel
    block (no ``resid_mid`` exists) and for blocks whose heads do not add up to their
    attention output on this architecture.
    """
    a = adapt(model)
    if stage not in _STAGES:
        raise EmbedwalkError(f"stage must be one of {_STAGES}, got {stage!r}")
    layer = a.check_layer(layer)
    a.require(f"resid_{stage}", layer, f"decompose at stage {stage!r}")
    for l in range(layer + 1):
        spec = a.blocks[l]
        if not spec.heads_exact and (l < layer or stage != "pre"):
            raise a.refuse(f"decompose through block {l}", f"its heads cannot be attributed exactly: {spec.heads_why}")
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
    (got,) = run(a, tokens, readers=[reader], progress=progress,
             on_logits=lambda lg, ctx: final_logits.append(lg[0, position].detach()))
    token_id = int(final_logits[0].argmax()) if token is None else a.token_id(token)
    spaced = a.spaced_token_id(token) if isinstance(token, str) else None
    if spaced is not None:  # token="Paris" where the model writes " Paris": the DLA of a slip
        warn_if_spaced_likelier(a, token, final_logits[0][[token_id, spaced]][None].float().cpu(), "token")

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
    # Per layer, a linear map from a raw attention vector to its share of hook_attn_out: the
    # post-norm with its scale frozen at its value for this position's attention output,
    # then the residual scale. Identity for plain blocks.
    attn_maps = {}
    for l in range(layer + 1):
        spec = a.blocks[l]
        if l in attn_layers:
            heads = got[("head", l)]
            b_O = a.b_O(l)
            b_O = b_O.detach().float().cpu() if _nonzero(b_O) else None
            m = _sublayer_map(a, spec.attn_post_norm, spec.residual_scale,
                              heads.double().sum(0) + (b_O.double() if b_O is not None else 0))
            attn_maps[l] = m
            mapped = m.apply(heads)
            for h in range(a.n_heads):
                add(mapped[h], "head", l, h)
            if b_O is not None:
                add(m.apply(b_O), "attn_bias", l)
            if m.bias is not None:
                add(m.bias, "attn_norm_bias", l)
        if l in mlp_layers:
            mlp = got[("mlp_out", l)]
            b_out = _bias(a.model.blocks[l].mlp, "b_out")
            plain = spec.mlp_post_norm is None and spec.residual_scale == 1.0
            if plain and _nonzero(b_out) and b_out.shape == mlp.shape:
                add(mlp - b_out, "mlp", l)
                add(b_out, "mlp_bias", l)
            else:
                add(mlp, "mlp", l)
    P = torch.stack(parts).detach()
    x = got[("resid", layer)].detach()

    with torch.no_grad():
        centre, gain, nbias = frozen_final_norm(a, x)
        # A linear output transform scales every logit alike; a soft-cap is not linear and is
        # left out of the attributions (they add up to the logit before it).
        k = a.output_scale if a.output_scale is not None else 1.0
        w_u = a.W_U[:, token_id].detach().double().cpu() * k
        Pd = P.double()
        if centre:
            Pd = Pd - Pd.mean(-1, keepdim=True)
        dla = ((Pd * gain) @ w_u).float()
        b_U = a.b_U
        ub = float(b_U[token_id]) * k if b_U is not None else 0.0
        xin = x.to(a.device, a.dtype)
        logit = float(a.readout(xin)[token_id])
        raw = float(a.readout(xin, transform=False)[token_id])
        pre_logit = logit if a.output_scale is not None else raw
        src = src_dla = None
        if by_source and attn_layers:
            src = torch.stack([attn_maps[l].apply(got[("src", l)]) for l in attn_layers])  # [layer, head, src, d]
            S = src.double()
            if centre:
                S = S - S.mean(-1, keepdim=True)
            src_dla = ((S * gain) @ w_u).float()
    dla_total = float(dla.double().sum()) + float(nbias @ w_u) + ub
    gap = float((P.double().sum(0) - x.double()).norm() / x.double().norm().clamp_min(1e-30))
    return DecompositionResult(
        residual_gap=gap, logit_gap=pre_logit - dla_total, dtype=str(a.dtype).replace("torch.", ""),
        tokens=tokens[0], str_tokens=a.to_str_tokens(tokens[0]), layer=layer, stage=stage, position=position,
        token=token_id, token_str=a.to_str_tokens([token_id])[0], residual=x, parts=P, kinds=kinds,
        part_layers=pl, part_heads=ph, dla=dla, norm_bias_dla=float(nbias @ w_u), unembed_bias_dla=ub,
        logit=logit, pre_transform_logit=pre_logit, source_parts=src, source_dla=src_dla,
        head_layers=list(attn_layers),
    )
