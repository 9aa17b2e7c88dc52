"""The one place that knows how to talk to a TransformerLens model.

Both generations are served unmodified: a TL 4.x ``TransformerBridge`` (raw or after
``enable_compatibility_mode()``) and a TL 2.x/3.x ``HookedTransformer``. Everything else in
embedwalk asks this adapter for sizes, hook names, weights and the final readout, so a new
model family means a change here and nowhere else.

What the adapter knows about an architecture it learns from one probe forward at
:func:`adapt` (2 x 12 fixed token ids), not from a list of families: which hook points fire
and with which shape, each block's layout (sequential, or parallel attention + MLP that both
read ``resid_pre``), each sublayer's post-norm and residual scale (:class:`BlockSpec`), and
how the embedding terms add up to ``resid_pre`` of block 0. A hook point that exists but
never fires, or fires flattened to ``[batch*pos, d_model]``, is served from its neighbours
where that is exact (e.g. ``attn_out = resid_mid - resid_pre``); what cannot be served is
refused by name. The same probe is the load-time self-check: the readout (final norm, the
model's own unembed, the model's own output-logits transform) must reproduce the model's
logits (log-probs in compatibility mode), and each block's parts must add up to its output;
otherwise :class:`~embedwalk.errors.ArchitectureError` names the model class, architecture,
generation/mode, the check, the gap and the suspected reason.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from embedwalk.errors import ArchitectureError, EmbedwalkError

__all__ = ["ModelAdapter", "adapt", "BlockSpec", "Source", "KNOWN_TL_GAPS"]

_ROW_BLOCK = 16

_ADAPTERS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelAdapter]" = weakref.WeakKeyDictionary()


def _signature(model) -> tuple:
    """What an adapter's probe depends on besides the weights' values: a new mode, dtype,
    device or unembedding tensor re-probes (the values are compared by fingerprint)."""
    W_U = getattr(model, "W_U", None)
    return (bool(getattr(model, "compatibility_mode", False)), getattr(W_U, "dtype", None),
            getattr(W_U, "device", None), getattr(W_U, "data_ptr", lambda: None)())


def adapt(model, *, accept_known_tl_gaps: bool = False) -> "ModelAdapter":
    """Return the (cached) adapter for ``model``; accepts an adapter too (returned as it is).

    Raises :class:`~embedwalk.errors.ArchitectureError` when the probe forward fails, the
    self-check fails, or the model is a known TransformerLens conversion failure
    (:data:`KNOWN_TL_GAPS`). ``accept_known_tl_gaps=True`` serves such a model anyway: every
    number then describes TransformerLens's model, which differs from the Hugging Face model
    by the listed gap. The adapter is cached, so one such call covers later implicit ones.

    The cached adapter is served only while the model's mode, dtype, device and the
    fingerprint of every parameter and buffer (:mod:`embedwalk.fingerprint`) are those it
    was built for: ``load_state_dict``, ``param.data.copy_(...)`` or any in-place edit of a
    weight between two calls builds a new adapter, so nothing it derived from the weights
    (readout parts, biases, probe results) is served stale. Taking the fingerprint reads
    every weight once (8-9% of one float32 forward pass of 4 x 128 tokens, 19% in bfloat16;
    figures in :mod:`embedwalk.fingerprint`), once per call with a model: public functions
    adapt their model once and hand the adapter on. An adapter passed in is trusted as it is; pass the
    model to have it checked.
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, torch.nn.Module):
        raise EmbedwalkError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}. Load one with embedwalk.load_model(...) or "
            "TransformerBridge.boot_transformers(...)."
        )
    from embedwalk.fingerprint import fingerprint

    fp = fingerprint(model, getattr(model, "W_U", None)) if getattr(model, "cfg", None) is not None else None
    adapter = _ADAPTERS.get(model)
    if adapter is None or adapter._signature != _signature(model) or adapter.fingerprint != fp:
        accept = accept_known_tl_gaps or (adapter is not None and adapter.known_tl_gap is not None)
        adapter = ModelAdapter(model, accept_known_tl_gaps=accept, _fingerprint=fp)
        _ADAPTERS[model] = adapter
    return adapter


# Known TransformerLens conversion failures: configurations where TL's model itself (not
# embedwalk) differs from the Hugging Face model, so the self-check (which compares against TL's
# own output) cannot see them. Rows: (architecture, HF config condition in words, predicate on
# the HF config, modes, max |log-prob| gap to HF measured on tiny random models with TL 4.3).
# Modes: "raw" / "compat" (TL 4 bridge); TL 3's HookedTransformer keeps no HF config, so its
# cases (BLOOM post-LN residual 7.7, Phi-3 partial_rotary_factor < 1 at 9.1 nats on TL 3.9)
# are documented in the README only.
KNOWN_TL_GAPS = (
    ("Qwen2MoeForCausalLM", "shared_expert_intermediate_size > 0",
     lambda c: (getattr(c, "shared_expert_intermediate_size", 0) or 0) > 0, ("compat",), 3.4),
    ("BloomForCausalLM", "apply_residual_connection_post_layernorm=True",
     lambda c: bool(getattr(c, "apply_residual_connection_post_layernorm", False)), ("compat",), 2.3),
    ("Gemma3ForCausalLM", "attn_logit_softcapping set",
     lambda c: getattr(c, "attn_logit_softcapping", None) is not None, ("raw", "compat"), 0.50),
    ("OPTForCausalLM", "word_embed_proj_dim != hidden_size",
     lambda c: getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size, ("compat",), 3.9),
)


def _known_tl_gap(model) -> Optional[tuple]:
    """The :data:`KNOWN_TL_GAPS` row that ``model`` (a TL 4 bridge) falls under, or None."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    if config is None:
        return None
    archs = tuple(getattr(config, "architectures", None) or ()) + (type(model.original_model).__name__,)
    mode = "compat" if getattr(model, "compatibility_mode", False) else "raw"
    for row in KNOWN_TL_GAPS:
        arch, _, pred, modes, _ = row
        if arch in archs and mode in modes:
            try:
                if pred(config):
                    return row
            except AttributeError:
                continue
    return None


@dataclass(frozen=True)
class ReadoutPoint:
    """A named place on the residual stream: index 0 is the embedding, l+1 the output of block l."""

    index: int
    hook: Optional[str]  # None: a point computed from others (a parallel block's walk midpoint)
    label: str


@dataclass(frozen=True)
class BlockSpec:
    """How block ``layer`` adds to the residual stream, as the probe forward found it.

    ``layout``: ``"sequential"`` (attention, then the MLP reads ``resid_mid``) or
    ``"parallel"`` (attention and MLP both read ``resid_pre``; there is no ``resid_mid``).
    ``attn_post_norm`` / ``mlp_post_norm``: the norm module applied to a sublayer's output
    before it joins the residual (Gemma-2/3, OLMo-2), or None. ``residual_scale``: the factor
    both sublayer outputs are multiplied by before joining (Granite's residual multiplier),
    1.0 for most models. ``heads_exact``: whether ``sum_h z_h W_O[h] + b_O`` through that
    post-norm and scale gives ``hook_attn_out`` (else ``heads_gap`` says by how much, NaN when
    the check could not run, and ``heads_why`` says why in words, e.g. which of ``hook_z`` and
    ``hook_attn_out`` is unavailable).
    """

    layer: int
    layout: str
    attn_post_norm: Optional[torch.nn.Module] = None
    mlp_post_norm: Optional[torch.nn.Module] = None
    residual_scale: float = 1.0
    heads_exact: bool = True
    heads_gap: float = 0.0
    heads_why: str = ""


@dataclass(frozen=True)
class Source:
    """Where a canonical hook's value comes from on this model: the signed sum of the real
    hook points in ``terms`` (one ``(name, +1)`` when the hook fires as it should). Hooks in
    ``flat`` fire as ``[batch*pos, ...]`` and are reshaped to ``[batch, pos, ...]``."""

    name: str
    terms: tuple
    flat: frozenset = frozenset()
    how: str = "fires"

    @property
    def direct(self) -> bool:
        """Whether the hook fires as itself, with the canonical shape."""
        return self.terms == ((self.name, 1),) and not self.flat


_PROBE_POS = 12


def _probe_ids(d_vocab: int) -> Tensor:
    """2 x 12 fixed ids spread over the vocabulary, away from the low special ids; row 0
    repeats one token at positions 3 and 9 (so token-only terms can be told from positional
    ones), and the rows differ at every position."""
    lo = min(3, d_vocab - 1)
    span = max(1, d_vocab - lo)
    rows = []
    for r, step in enumerate((7919, 104729)):
        rows.append([lo + (r * 31 + 17 + i * step) % span for i in range(_PROBE_POS)])
    rows[0][9] = rows[0][3]
    if rows[1][3] == rows[0][3]:
        rows[1][3] = lo + (rows[1][3] - lo + 1) % span
    return torch.tensor(rows)


class ModelAdapter:
    """Sizes, hook names, weights, block layouts and the final readout of a TransformerLens model.

    Construction runs the probe forward and the load-time self-check (see the module
    docstring); it raises :class:`~embedwalk.errors.ArchitectureError` when the readout does
    not reproduce the model's logits. Per-capability refusals (no ``resid_mid`` on a
    parallel block, a hook that cannot be derived) are raised when that capability asks.
    """

    def __init__(self, model: torch.nn.Module, *, accept_known_tl_gaps: bool = False, _fingerprint=None):
        hook_dict = getattr(model, "hook_dict", None)
        cfg = getattr(model, "cfg", None)
        if not hook_dict or cfg is None:
            raise EmbedwalkError(
                f"{type(model).__name__} has no TransformerLens hook points (no .hook_dict/.cfg). "
                "Wrap a Hugging Face model with TransformerBridge.boot_transformers(...) first, or "
                "use embedwalk.load_model(...)."
            )
        self.model = model
        self.cfg = cfg
        self._signature = _signature(model)
        self.generation = "bridge" if type(model).__name__ == "TransformerBridge" else "hooked"
        self.compat = bool(getattr(model, "compatibility_mode", False))
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.n_heads: int = int(cfg.n_heads)
        self.d_head: int = int(getattr(cfg, "d_head", self.d_model // self.n_heads))
        self.n_kv_heads: int = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        gap_row = _known_tl_gap(model) if self.generation == "bridge" else None
        if gap_row is not None and not accept_known_tl_gaps:
            arch, cond, _, _, measured = gap_row
            raise ArchitectureError(
                f"{self._where()}: TransformerLens's conversion of {arch} with {cond} in this mode is known "
                f"to differ from the Hugging Face model (by up to {measured:g} nats of log-prob, measured on "
                "tiny random models); embedwalk's self-check compares against TransformerLens's own output and "
                "cannot see this, so it refuses rather than report numbers about a different model. "
                + ("Use raw mode (no enable_compatibility_mode()), or " if "raw" not in gap_row[3] else "")
                + "pass adapt(model, accept_known_tl_gaps=True) to study TransformerLens's model as it is."
            )
        self.known_tl_gap = gap_row
        from embedwalk.fingerprint import fingerprint

        #: The :class:`~embedwalk.fingerprint.Fingerprint` of the weights this adapter was
        #: built for; :func:`adapt` builds a new adapter when it no longer matches.
        self.fingerprint = _fingerprint if _fingerprint is not None else fingerprint(model, getattr(model, "W_U", None))
        self._ln_final, self._project_out = self._readout_modules()
        self.d_vocab: int = int(self.W_U.shape[-1])
        self._probe()

    # ------------------------------------------------------------------ identity
    @property
    def architecture(self) -> str:
        """The TransformerLens architecture name (the bridge's adapter class or TL 3's
        ``cfg.original_architecture``)."""
        if self.generation == "bridge":
            arch = getattr(self.cfg, "architecture", None) or type(getattr(self.model, "adapter", None)).__name__
        else:
            arch = getattr(self.cfg, "original_architecture", None)
        return str(arch or "unknown")

    @property
    def mode(self) -> str:
        if self.generation == "hooked":
            return "TL 3 HookedTransformer"
        return "TL 4 TransformerBridge, " + ("compatibility mode" if self.compat else "raw")

    def _where(self) -> str:
        return f"{type(self.model).__name__} ({self.architecture}; {self.mode})"

    def refuse(self, what: str, why: str, fix: str = "") -> ArchitectureError:
        """Returns (does not raise) an :class:`ArchitectureError` for ``what`` on this model,
        naming the architecture; callers ``raise adapter.refuse(...)``."""
        return ArchitectureError(f"{what} is not available on {self._where()}: {why}" + (f". {fix}" if fix else ""))

    # ------------------------------------------------------------------ probe
    def _tol(self) -> float:
        return 2e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-4

    def _declared_parallel(self, layer: int) -> bool:
        block = self.model.blocks[layer]
        if self.generation == "bridge":
            return "Parallel" in type(block).__name__
        return bool(getattr(self.cfg, "parallel_attn_mlp", False))

    def _post_norm(self, layer: int, which: str) -> Optional[torch.nn.Module]:
        block = self.model.blocks[layer]
        mod = getattr(block, f"{which}_post", None) if f"{which}_post" in dict(block.named_children()) else None
        return mod if isinstance(mod, torch.nn.Module) else None

    def _probe(self) -> None:
        """One forward on :func:`_probe_ids`: learn the hook sources and block specs, and run
        the self-check (readout = model logits; block parts add up)."""
        hook_dict = self.model.hook_dict
        kinds = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "v", "pattern", "q", "k", "scores")
        names = ["hook_embed", "hook_pos_embed"] + [self._HOOKS[k].format(l=l) for l in range(self.n_layers) for k in kinds]
        seen: dict[str, Tensor] = {}
        handles = []
        for name in names:
            if name in hook_dict:
                handles.append(hook_dict[name].register_forward_hook(
                    lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach()) if isinstance(out, Tensor) else None))
        ids = _probe_ids(self.d_vocab)
        B, P = ids.shape
        try:
            with eval_mode(self.model), torch.no_grad():
                logits = self.model(ids.to(self.device))
        except Exception as exc:  # the model's own forward, not embedwalk's arithmetic, failed
            raise ArchitectureError(
                f"{self._where()}: the model's own forward pass failed on the probe ({type(exc).__name__}: "
                f"{exc}). TransformerLens cannot run this configuration of {self.architecture}, so embedwalk "
                "cannot serve it; the original error is chained below."
            ) from exc
        finally:
            for h in handles:
                h.remove()
        self.shapes = {n: tuple(v.shape) for n, v in seen.items()}
        self.sources: dict[str, Source] = {}
        self.unavailable: dict[str, str] = {}
        flat = set()

        def val(name):
            v = seen.get(name)
            if v is None:
                return None
            if v.shape[:2] != (B, P) and v.shape[0] == B * P:
                flat.add(name)
                v = v.reshape(B, P, *v.shape[1:])
            return v.double()

        def not_fired(name):
            return "is not a hook point of this model" if name not in hook_dict else "exists but never fires"

        tol = self._tol()

        def gap(a, b) -> float:
            return float((a - b).abs().max() / (1.0 + b.abs().max()))

        def put(name, terms, how):
            flats = frozenset(n for n, _ in terms if n in flat)
            if flats:
                how += f" ({', '.join(sorted(flats))} fire flattened to [batch*pos, ...]; reshaped)"
            self.sources[name] = Source(name, tuple(tuple(t) for t in terms), flats, how)

        resid = {}
        for l in range(self.n_layers):
            for k in ("resid_pre", "resid_post"):
                name = self._HOOKS[k].format(l=l)
                if val(name) is None:
                    raise ArchitectureError(
                        f"{self._where()}: hook {name} {not_fired(name)}; embedwalk reads the residual stream "
                        "at blocks.{l}.hook_resid_pre/post, which every TransformerLens block should fire."
                    )
                resid[(k, l)] = val(name)
                put(name, [(name, 1)], "fires")

        # ---- embedding terms: hook_embed (+ hook_pos_embed) must add up to resid_pre of block 0
        R0 = resid[("resid_pre", 0)]
        token_only = gap(R0[0, 3], R0[0, 9]) <= tol
        E, Pp = val("hook_embed"), val("hook_pos_embed")
        pre0 = self._HOOKS["resid_pre"].format(l=0)
        self.has_pos_embed = False
        if E is not None and E.shape[-1] != self.d_model:
            # OPT with word_embed_proj_dim != hidden_size: hook_embed fires before project_in.
            E = None
        if E is None and Pp is not None and "hook_embed" in seen and gap((R0 - Pp)[0, 3], (R0 - Pp)[0, 9]) <= tol:
            put("hook_embed", [(pre0, 1), ("hook_pos_embed", -1)],
                "derived: resid_pre(0) - hook_pos_embed (hook_embed fires before project_in)")
            put("hook_pos_embed", [("hook_pos_embed", 1)], "fires")
            self.has_pos_embed = True
        elif E is not None and Pp is not None and gap(E + Pp, R0) <= tol:
            put("hook_embed", [("hook_embed", 1)], "fires")
            put("hook_pos_embed", [("hook_pos_embed", 1)], "fires")
            self.has_pos_embed = True
        elif E is not None and gap(E, R0) <= tol:
            put("hook_embed", [("hook_embed", 1)], "fires")
            self.unavailable["hook_pos_embed"] = "the model adds no position vector to the residual stream"
        elif E is not None and not token_only and gap((R0 - E)[0], (R0 - E)[1]) <= tol:
            # The position part exists but never reaches hook_pos_embed (XGLM's sinusoids).
            put("hook_embed", [("hook_embed", 1)], "fires")
            put("hook_pos_embed", [(pre0, 1), ("hook_embed", -1)], "derived: resid_pre(0) - hook_embed")
            self.has_pos_embed = True
        elif E is None and token_only:
            put("hook_embed", [(pre0, 1)], "derived: resid_pre(0) (hook_embed never fires; no position vector)")
            self.unavailable["hook_pos_embed"] = "the model adds no position vector to the residual stream"
        else:
            why = ("hook_embed " + not_fired("hook_embed")) if E is None else (
                f"hook_embed + hook_pos_embed miss resid_pre of block 0 by {gap(E + (Pp if Pp is not None else 0), R0):.3g}")
            for n in ("hook_embed", "hook_pos_embed"):
                self.unavailable[n] = why + " and the rest is not a pure position term"

        # ---- blocks
        self.blocks: list[BlockSpec] = []
        for l in range(self.n_layers):
            self.blocks.append(self._probe_block(l, val, resid, put, not_fired, gap, tol))

        # ---- the readout must reproduce the model's own output
        final = resid[("resid_post", self.n_layers - 1)]
        with torch.no_grad():
            mine = self.readout(final.to(self.dtype)).double()
        theirs = logits.double()
        if self.compat:
            mine, theirs, unit = mine.log_softmax(-1), theirs.log_softmax(-1), "log-prob"
        else:
            unit = "logit"
        spread = (theirs.amax(-1) - theirs.amin(-1)).clamp_min(1e-6)
        err = float(((mine - theirs).abs().amax(-1) / spread).max())
        self.readout_gap = err
        rtol = 2e-2 if self.dtype in (torch.float16, torch.bfloat16) else 2e-5
        if not err <= rtol:
            ratio = float((theirs / mine.where(mine.abs() > 1e-6, torch.ones_like(mine))).median())
            suspect = (
                "the logits are soft-capped or rescaled after the unembedding by a transform embedwalk "
                f"does not see (median model/readout ratio {ratio:.3g})" if abs(ratio - 1) > 1e-3 else
                "a module sits between the final residual and the logits that final norm -> unembed misses"
                + ("" if self._ln_final is not None else " (no final norm was found: model.ln_final is absent)")
            )
            raise ArchitectureError(
                f"load-time self-check failed on {self._where()}: readout(final resid_post) = final norm -> "
                f"unembed -> output transform misses the model's own {unit}s by {err:.3g} x the per-position "
                f"spread (tolerance {rtol:g}). Suspected: {suspect}. Every lens reads through this readout, so "
                "embedwalk refuses the model rather than print wrong numbers; please report the architecture."
            )

    def _probe_block(self, l, val, resid, put, not_fired, gap, tol) -> BlockSpec:
        h = lambda k: self._HOOKS[k].format(l=l)  # noqa: E731
        pre, post = resid[("resid_pre", l)], resid[("resid_post", l)]
        mid, attn, mlp = val(h("resid_mid")), val(h("attn_out")), val(h("mlp_out"))
        parallel = self._declared_parallel(l)
        if parallel and mid is not None:
            raise ArchitectureError(
                f"{self._where()}: block {l} is declared parallel (attention and MLP both read resid_pre) "
                "yet fires hook_resid_mid; its configuration and structure disagree."
            )
        why_mid = ("this block is parallel: attention and MLP both read resid_pre, so no resid_mid exists. "
                   "Read resid_pre, resid_post, attn_out or mlp_out instead (resid_pre + attn_out is the walk's midpoint)")
        if parallel:
            self.unavailable[h("resid_mid")] = why_mid
            terms = {}
            if attn is not None:
                terms["attn_out"] = ([(h("attn_out"), 1)], "fires")
            elif mlp is not None:
                terms["attn_out"] = ([(h("resid_post"), 1), (h("resid_pre"), -1), (h("mlp_out"), -1)],
                                     "derived: resid_post - resid_pre - mlp_out")
            if mlp is not None:
                terms["mlp_out"] = ([(h("mlp_out"), 1)], "fires")
            elif attn is not None:
                terms["mlp_out"] = ([(h("resid_post"), 1), (h("resid_pre"), -1), (h("attn_out"), -1)],
                                    "derived: resid_post - resid_pre - attn_out")
            if attn is None or mlp is None:
                for k in ("attn_out", "mlp_out"):
                    if k not in terms:
                        self.unavailable[h(k)] = "hook_attn_out and hook_mlp_out never fire on this parallel block"
            elif gap(pre + attn + mlp, post) > tol:
                for k in ("attn_out", "mlp_out"):
                    self.unavailable[h(k)] = (f"resid_pre + attn_out + mlp_out misses resid_post by "
                                              f"{gap(pre + attn + mlp, post):.3g} (tolerance {tol:g})")
                terms = {}
        else:
            terms = {}
            if mid is not None:
                terms["resid_mid"] = ([(h("resid_mid"), 1)], "fires")
            elif attn is not None:
                terms["resid_mid"] = ([(h("resid_pre"), 1), (h("attn_out"), 1)], "derived: resid_pre + attn_out")
                mid = pre + attn
            else:
                self.unavailable[h("resid_mid")] = f"hook_resid_mid and hook_attn_out {not_fired(h('resid_mid'))}"
            if mid is not None:
                terms["attn_out"] = ([(h("attn_out"), 1)], "fires") if attn is not None else (
                    [(h("resid_mid"), 1), (h("resid_pre"), -1)], "derived: resid_mid - resid_pre")
                terms["mlp_out"] = ([(h("mlp_out"), 1)], "fires") if mlp is not None else (
                    [(h("resid_post"), 1), (h("resid_mid"), -1)], "derived: resid_post - resid_mid")
                a = attn if attn is not None else mid - pre
                m = mlp if mlp is not None else post - mid
                bad = [(what, g) for what, g in (("resid_pre + attn_out vs resid_mid", gap(pre + a, mid)),
                                                  ("resid_mid + mlp_out vs resid_post", gap(mid + m, post))) if g > tol]
                if bad:
                    for k in ("attn_out", "mlp_out"):
                        self.unavailable[h(k)] = "; ".join(f"{w} differ by {g:.3g}" for w, g in bad) + f" (tolerance {tol:g})"
                        terms.pop(k, None)
                attn, mlp = a, m
        for k, (t, how) in terms.items():
            put(h(k), t, how)
        for k in ("z", "v", "pattern", "q", "k", "scores"):
            if val(h(k)) is not None:
                put(h(k), [(h(k), 1)], "fires")
            else:
                self.unavailable[h(k)] = f"attn.hook_{k} {not_fired(h(k))}"
        # ---- how the heads' outputs become hook_attn_out: plain, through a post-norm, scaled
        post_a, post_m = self._post_norm(l, "ln1"), self._post_norm(l, "ln2")
        spec = dict(layer=l, layout="parallel" if parallel else "sequential", attn_post_norm=post_a, mlp_post_norm=post_m)
        z = val(h("z"))
        missing = [(n, self.unavailable.get(n, not_fired(n))) for n in (h("z"), h("attn_out"))
                   if (val(n) is None if n == h("z") else n not in self.sources)]
        if missing:
            why = "; ".join(f"{n} is unavailable: {r}" for n, r in missing)
            return BlockSpec(**spec, heads_exact=False, heads_gap=float("nan"),
                             heads_why=why + ", so the heads cannot be checked against hook_attn_out")
        z = z.reshape(*z.shape[:2], self.n_heads, self.d_head)
        o = torch.einsum("bphd,hdm->bpm", z, self.W_O(l).detach().double())
        b_O = self.b_O(l)
        if b_O is not None:
            o = o + b_O.detach().double()
        if post_a is not None:
            with torch.no_grad():
                o = post_a(o.to(self.dtype)).double()
        scale = float((o * attn).sum() / (o * o).sum().clamp_min(1e-300))
        if abs(scale - 1) <= tol:
            scale = 1.0
        g = gap(scale * o, attn)
        why = "" if g <= tol else (f"sum_h z_h W_O[h] + b_O (through the block's post-norm and residual scale) "
                                   f"misses hook_attn_out by {g:.3g} on the probe (tolerance {tol:g})")
        return BlockSpec(**spec, residual_scale=scale, heads_exact=g <= tol, heads_gap=g, heads_why=why)

    # Final norms that the wrapped Hugging Face model runs but the bridge maps no ln_final for:
    # TL 4.3's OPT adapter drops ln_final whenever word_embed_proj_dim != hidden_size, yet HF's
    # OPTDecoder still applies final_layer_norm (do_layer_norm_before=True) before project_out.
    _HF_FINAL_NORMS = ("model.decoder.final_layer_norm",)

    def _readout_modules(self):
        """``(final norm or None, project_out or None)``: what lies between the final
        ``resid_post`` and the unembed. The load-time self-check verifies the chain."""
        norm = getattr(self.model, "ln_final", None)
        proj = getattr(self.model, "project_out", None) if self.generation == "bridge" else None
        if not isinstance(norm, torch.nn.Module) and self.generation == "bridge":
            norm = None
            hf = getattr(self.model, "original_model", None)
            for path in self._HF_FINAL_NORMS:
                mod = hf
                for part in path.split("."):
                    mod = getattr(mod, part, None)
                if isinstance(mod, torch.nn.Module):
                    norm = mod
                    break
        return (norm if isinstance(norm, torch.nn.Module) else None,
                proj if isinstance(proj, torch.nn.Module) else None)

    _HOOKS = {
        "resid_pre": "blocks.{l}.hook_resid_pre",
        "resid_mid": "blocks.{l}.hook_resid_mid",
        "resid_post": "blocks.{l}.hook_resid_post",
        "attn_out": "blocks.{l}.hook_attn_out",
        "mlp_out": "blocks.{l}.hook_mlp_out",
        "pattern": "blocks.{l}.attn.hook_pattern",
        "z": "blocks.{l}.attn.hook_z",
        "v": "blocks.{l}.attn.hook_v",
        "q": "blocks.{l}.attn.hook_q",
        "k": "blocks.{l}.attn.hook_k",
        "scores": "blocks.{l}.attn.hook_attn_scores",
    }

    def hook(self, kind: str, layer: int) -> str:
        """Canonical hook name of ``kind`` (resid_pre, attn_out, pattern, z, ...) at ``layer``."""
        if kind not in self._HOOKS:
            raise EmbedwalkError(f"unknown hook kind {kind!r}; choose one of {sorted(self._HOOKS)}")
        return self._HOOKS[kind].format(l=self.check_layer(layer))

    @property
    def final_resid_hook(self) -> str:
        """The residual that the final norm reads: the composite context vector lives here."""
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def check_layer(self, layer: int, *, allow_end: bool = False) -> int:
        top = self.n_layers + (1 if allow_end else 0)
        if not isinstance(layer, (int,)) or isinstance(layer, bool):
            raise EmbedwalkError(f"layer must be an int, got {layer!r}")
        if layer < 0:
            layer += top
        if not 0 <= layer < top:
            raise EmbedwalkError(
                f"layer {layer} is out of range: this model has {self.n_layers} blocks "
                f"(valid: 0..{top - 1}, or negative from the end)"
            )
        return layer

    def source(self, name: str) -> Source:
        """Where the value of hook point ``name`` comes from on this model (see :class:`Source`).

        Raises :class:`~embedwalk.errors.ArchitectureError` for a canonical hook this
        architecture cannot provide exactly (e.g. ``resid_mid`` of a parallel block), and
        :class:`~embedwalk.errors.EmbedwalkError` for a name that is no hook point at all.
        """
        src = self.sources.get(name)
        if src is not None:
            return src
        if name in self.unavailable:
            raise self.refuse(name, self.unavailable[name])
        if name in self.model.hook_dict:
            return Source(name, ((name, 1),))
        raise EmbedwalkError(f"no such hook point on this model: {name!r}")

    def require(self, kind: str, layer: int, what: str) -> str:
        """The hook name of ``kind`` at ``layer``; an ArchitectureError naming ``what`` when
        this architecture cannot provide it."""
        name = self.hook(kind, layer)
        if name not in self.sources and name in self.unavailable:
            raise self.refuse(f"{what} (it needs {name})", self.unavailable[name])
        return name

    def taps(self, name: str, deliver) -> list:
        """``[(real hook name, fn(value, ctx))]`` that together call ``deliver(value, ctx)``
        once per forward pass with the value of hook ``name`` as ``[batch, pos, ...]``: the
        hook itself, or its :class:`Source` terms (reshaped when flattened, summed when
        derived). The one place that turns a canonical hook into what really fires."""
        src = self.source(name)
        if src.direct:
            return [(src.terms[0][0], deliver)]
        state: dict = {}
        first = self._HOOKS["resid_pre"].format(l=0)
        n_terms = len(src.terms)

        def start(value, ctx):  # fires once per forward, before any block hook
            state["bp"] = tuple(value.shape[:2])

        def term(i, real, sign):
            def fn(value, ctx):
                if real in src.flat:
                    value = value.reshape(*state["bp"], *value.shape[1:])
                if i in state:  # left over from a forward pass that raised part-way
                    for k in range(n_terms):
                        state.pop(k, None)
                state[i] = value if sign == 1 else -value
                if sum(1 for k in state if isinstance(k, int)) == n_terms:
                    total = state[0]
                    for k in range(1, n_terms):
                        total = total + state[k]
                    for k in range(n_terms):
                        state.pop(k)
                    deliver(total, ctx)
            return fn

        out = [(first, start)]
        out += [(real, term(i, real, sign)) for i, (real, sign) in enumerate(src.terms)]
        return out

    @property
    def parallel(self) -> bool:
        """Whether any block is parallel (attention and MLP both read ``resid_pre``)."""
        return any(b.layout == "parallel" for b in self.blocks)

    def readout_points(self, *, mid: bool = False) -> list[ReadoutPoint]:
        """The embedding, then each block's output (and, with ``mid``, each block's midpoint).

        Raises :class:`~embedwalk.errors.ArchitectureError` for ``mid`` on a model with
        parallel blocks: they have no midpoint (both sublayers read ``resid_pre``).
        """
        if mid:
            for b in self.blocks:
                if b.layout == "parallel":
                    raise self.refuse(
                        "a mid readout (resid_mid)", "its blocks are parallel: attention and MLP both read "
                        "resid_pre and their outputs are added together, so no midpoint exists",
                        "Read the block outputs (mid=False), or use walk_lens, which splits a parallel "
                        "block into its attention and MLP steps")
                self.require("resid_mid", b.layer, "a mid readout")
        points = [ReadoutPoint(0, self.hook("resid_pre", 0), "embed")]
        for layer in range(self.n_layers):
            if mid:
                points.append(ReadoutPoint(len(points), self.hook("resid_mid", layer), f"{layer}.mid"))
            points.append(ReadoutPoint(len(points), self.hook("resid_post", layer), str(layer)))
        return points

    # ------------------------------------------------------------------ attention
    def attention_window(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer``'s attention, or None for full causal attention.

        Query ``i`` reaches key ``j`` when ``j <= i`` and ``i - j < window`` (positions of the
        padded sequence, as Hugging Face and TransformerLens mask them). Read from the model:
        TL 2/3 ``cfg.attn_types``/``cfg.window_size``; on the bridge from the wrapped Hugging
        Face attention and its config (``layer_types``/``sliding_window``, GPT-Neo's
        ``attention_type``/``window_size``), because the bridge's own cfg fields may be None.
        Raises :class:`~embedwalk.errors.ArchitectureError` for a layer kind it does not know
        (e.g. Llama-4's chunked attention). :meth:`reach` builds on it and is what every
        capability asks.
        """
        layer = self.check_layer(layer)
        if self.generation != "bridge":
            kinds = getattr(self.cfg, "attn_types", None)
            if kinds is None or kinds[layer] == "global":
                return None
            if kinds[layer] == "local":
                return int(self.cfg.window_size)
            raise self.refuse(f"which keys attention layer {layer} reaches",
                              f"its attention type {kinds[layer]!r} is neither 'global' nor 'local'")
        hf = getattr(self.model.blocks[layer].attn, "original_component", None)
        config = getattr(hf, "config", None) or getattr(getattr(self.model, "original_model", None), "config", None)
        kind = getattr(hf, "attention_type", None)  # GPT-Neo: "global" | "local"
        if kind in ("global", "local"):
            return int(config.window_size) if kind == "local" else None
        types = getattr(config, "layer_types", None)
        if types is not None:
            if types[layer] == "full_attention":
                return None
            if types[layer] == "sliding_attention":
                return int(config.sliding_window)
            raise self.refuse(
                f"which keys attention layer {layer} reaches",
                f"it is a {types[layer]!r} layer of {type(hf).__name__}; embedwalk knows only full and "
                "sliding-window causal attention (not chunked attention, whose keys restart at each "
                "chunk boundary), so it cannot say which keys this layer reaches",
            )
        if getattr(config, "attention_chunk_size", None) is not None:
            raise self.refuse(f"which keys attention layer {layer} reaches",
                              f"{type(hf).__name__}'s config sets attention_chunk_size but names no layer_types, "
                              "so which layers are chunked is unknown")
        window = getattr(config, "sliding_window", None)
        if window is None or getattr(config, "use_sliding_window", True) is False:
            return None
        return int(window)  # Mistral, Mixtral, Phi-3, StarCoder2: every layer slides

    def reach(self, layer: int, mask: Bool[Tensor, "batch pos"], *, window: bool = True
              ) -> Bool[Tensor, "batch query key"]:
        """Which keys each query of ``layer``'s attention reaches: True where query ``q`` may
        attend key ``k``. The one answer every uniform baseline, key count and self-attention
        expectation in embedwalk is computed from.

        ``mask``: ``[batch, pos]``, True on real tokens (:attr:`embedwalk.inputs.Batch.mask`;
        either padding side). ``reach[b, q, k]`` is True when ``k <= q``, key ``k`` is a real
        token, and, on a sliding-window layer (:meth:`attention_window`, ``w``), ``q - k < w``
        with positions of the padded sequence, as Hugging Face and TransformerLens mask them
        (checked against the Hugging Face model's own eager attention weights, left padding
        included, in ``tests/test_reach.py``). Rows of padding queries follow the same rule
        (the model's outputs there mean nothing); a left-padding query before the first real
        token reaches no key. ``window=False`` ignores the sliding window: the whole causal
        prefix of real tokens, for the ``keys="prefix"`` counterfactual of the uniform swap.
        Returned on ``mask``'s device.

        Raises :class:`~embedwalk.errors.ArchitectureError` where the answer would be a guess:
        chunked attention (Llama-4 ``attention_chunk_size``), attention sinks (GPT-OSS's
        learned per-head ``sinks`` logit, which takes softmax mass from every key so no
        distribution over keys is uniform), or a layer type it does not know.
        """
        w = self.attention_window(layer)
        if self.generation == "bridge":
            hf = getattr(self.model.blocks[layer].attn, "original_component", None)
            if isinstance(getattr(hf, "sinks", None), Tensor):
                raise self.refuse(
                    f"which keys attention layer {layer} reaches",
                    f"{type(hf).__name__} has attention sinks (a learned logit per head that joins every "
                    "query's softmax), so its weights over the keys do not sum to 1 and a uniform "
                    "expectation over them is undefined; embedwalk does not model sinks")
        if not isinstance(mask, Tensor) or mask.ndim != 2:
            raise EmbedwalkError(f"mask must be a [batch, pos] tensor (True on real tokens), got "
                                 f"{getattr(mask, 'shape', type(mask).__name__)}")
        mask = mask.bool()
        idx = torch.arange(mask.shape[-1], device=mask.device)
        gap = idx[:, None] - idx[None, :]  # q - k
        allowed = gap >= 0
        if window and w is not None:
            allowed = allowed & (gap < w)
        return allowed[None] & mask[:, None, :]

    # ------------------------------------------------------------------ weights
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding as a map from the (final-normed) residual stream to logits.

        The model's own ``W_U``, except where a ``project_out`` sits between the final norm and
        the unembed (OPT with ``word_embed_proj_dim != hidden_size``): then it is
        ``W_project_out^T @ W_U`` (computed in float64, cast to the model's dtype), so that
        attributions and token vectors stay in the residual basis. :meth:`readout` calls the
        modules themselves."""
        if self._project_out is None:
            return self.model.W_U
        if getattr(self, "_W_U_folded", None) is None:
            W = self._project_out.original_component.weight  # [d_proj, d_model]
            self._W_U_folded = (W.detach().double().T @ self.model.W_U.detach().double()).to(W.dtype)
        return self._W_U_folded

    @property
    def b_U(self) -> Optional[Float[Tensor, "d_vocab"]]:
        b = getattr(self.model, "b_U", None)
        return b if isinstance(b, Tensor) else None

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding in the residual basis: the model's own ``W_E``, or
        ``W_E @ W_project_in^T`` where a ``project_in`` maps it into the residual stream (OPT
        with ``word_embed_proj_dim != hidden_size``; float64 product cast to the model dtype)."""
        proj = getattr(self.model, "project_in", None) if self.generation == "bridge" else None
        if not isinstance(proj, torch.nn.Module):
            return self.model.W_E
        if getattr(self, "_W_E_folded", None) is None:
            W = proj.original_component.weight  # [d_model, d_proj]
            self._W_E_folded = (self.model.W_E.detach().double() @ W.detach().double().T).to(W.dtype)
        return self._W_E_folded

    @property
    def W_pos(self) -> Optional[Float[Tensor, "n_ctx d_model"]]:
        """The learned position table, when ``hook_pos_embed`` fires with its rows."""
        src = self.sources.get("hook_pos_embed")
        return self.model.W_pos if src is not None and src.direct else None

    def W_O(self, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
        return self.model.blocks[self.check_layer(layer)].attn.W_O

    def b_O(self, layer: int) -> Optional[Float[Tensor, "d_model"]]:
        try:
            b = self.model.blocks[self.check_layer(layer)].attn.b_O
        except AttributeError:  # the bridge raises for bias-free projections
            return None
        return b if isinstance(b, Tensor) else None

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_U.dtype

    # ------------------------------------------------------------------ readout
    def final_norm(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The model's own final norm applied to ``x`` with statistics recomputed for ``x``.

        The module is called rather than re-implemented, so LayerNorm, RMSNorm, Gemma-style
        offsets and compatibility-mode folding all stay exactly the model's. Its hook points do
        fire; embedwalk never attaches readers to ``ln_final`` hooks for that reason.
        """
        if self._ln_final is None:  # none found: the self-check verified the readout without one
            return x
        shape = x.shape
        flat = x.reshape(1, -1, shape[-1])  # TL norms expect [batch, pos, d_model]
        return self._ln_final(flat).reshape(shape)

    def output_transform(self, logits: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "... d_vocab"]:
        """The model's own post-unembedding transform (Gemma-2's soft-cap, Granite's
        ``logits_scaling``, Cohere's ``logit_scale``): the bridge's architecture adapter's
        ``apply_output_logits_transform``, or TL 3's ``output_logits_soft_cap``. Identity for
        most models."""
        if self.generation == "bridge":
            fn = getattr(getattr(self.model, "adapter", None), "apply_output_logits_transform", None)
            return fn(logits) if fn is not None else logits
        cap = float(getattr(self.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    @property
    def output_scale(self) -> Optional[float]:
        """The factor of :meth:`output_transform` when it is ``logits * factor`` (1.0 for
        none), None when it is not linear (a soft-cap)."""
        if not hasattr(self, "_output_scale"):
            y = torch.linspace(-50, 50, 101, dtype=torch.float64).to(self.device, self.dtype)[None]
            t = self.output_transform(y).double()
            yd = y.double()
            k = float(t[0, -1] / yd[0, -1])
            linear = float((t - k * yd).abs().max()) <= 1e-5 * (1 + float(t.abs().max()))
            self._output_scale = (1.0 if abs(k - 1) < 1e-7 else k) if linear else None
        return self._output_scale

    def readout(self, x: Float[Tensor, "... d_model"], *, transform: bool = True) -> Float[Tensor, "... d_vocab"]:
        """Logits of any residual vector: the model's final norm, its ``project_out`` where it
        has one (OPT with ``word_embed_proj_dim != hidden_size``), then its own unembed module,
        then its own output transform (:meth:`output_transform`; skipped with
        ``transform=False``). The load-time self-check verified that this reproduces the
        model's logits from its final ``resid_post``.

        The unembed module (not ``x @ W_U``) is called so the float32 arithmetic is the
        model's own: a re-implemented product differs from the model's logits by ~3e-5 on
        SmolLM2, above the 1e-5 the final readout must meet. For the same reason rows are
        padded to a multiple of 16: CPU BLAS rounds a ragged tail of rows differently, while
        the model's own forward pass sends ordinary batches through the main kernel.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n = flat.shape[0]
        pad = -n % _ROW_BLOCK
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, shape[-1])])
        h = flat[None] if self._ln_final is None else self._ln_final(flat[None])
        if self._project_out is not None:
            h = self._project_out(h)
        logits = self.model.unembed(h)[0]
        if transform:
            logits = self.output_transform(logits)
        return logits[:n].reshape(*shape[:-1], logits.shape[-1])

    def readout_parts(self) -> "ReadoutParts":
        """:meth:`readout` split so the logits can be produced a vocabulary block at a time:
        ``normed(x)`` (final norm, then ``project_out`` folded into ``W_U``), ``W_U``
        ``[d_model, d_vocab]``, ``b_U`` (or None) and the elementwise :meth:`output_transform`.

        Checked once per adapter against :meth:`readout` on rows of the unembedding's own
        scale; a mismatch beyond float rounding raises :class:`ArchitectureError` (blocks of
        a readout that is not ``transform(norm(x) @ W_U + b_U)`` would be wrong numbers)."""
        if getattr(self, "_readout_parts", None) is None:
            parts = ReadoutParts(self)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(6, self.d_model, generator=g, dtype=torch.float64).to(self.device, self.dtype)
            with torch.no_grad():
                want = self.readout(x).double()
                step = -(-self.d_vocab // 3)  # three blocks: a transform that mixes them shows
                got = torch.cat([parts.block(parts.normed(x), j0, j0 + step) for j0 in range(0, self.d_vocab, step)], -1).double()
            if not bool(torch.isfinite(want).all()):
                raise ArchitectureError(
                    f"{type(self.model).__name__}: its readout gives non-finite logits (NaN or inf) "
                    "on random residual rows; check the final norm and unembedding weights"
                )
            gap = float((got - want).abs().max())
            tol = (1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2) * (1 + float(want.abs().max()))
            if not gap <= tol:
                raise ArchitectureError(
                    f"{type(self.model).__name__}: its readout is not final norm -> W_U (+ b_U) -> an "
                    f"elementwise output transform (blocks of it differ from the model's readout by "
                    f"{gap:.2e}), so the logit lens cannot read it a vocabulary block at a time"
                )
            self._readout_parts = parts
        return self._readout_parts

    # ------------------------------------------------------------------ tokens
    @property
    def tokenizer(self):
        return getattr(self.model, "tokenizer", None)

    def require_tokenizer(self, what: str = "text"):
        if self.tokenizer is None:
            raise EmbedwalkError(
                f"this model has no tokenizer, so it cannot take {what}; pass token ids "
                "(a LongTensor [batch, pos]) instead, or build the model with tokenizer=..."
            )
        return self.tokenizer

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tok, name, None) if tok is not None else None
            if value is not None:
                return int(value)
        return 0

    def to_tokens(self, text: str, *, prepend_bos: Optional[bool] = None) -> Tensor:
        """Token ids of one string, with the model's own BOS convention."""
        self.require_tokenizer()
        kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        return self.model.to_tokens(text, **kwargs)[0].to("cpu")

    def token_id(self, token) -> int:
        """An id from an int or a string that is exactly one token."""
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < self.d_vocab:
                raise EmbedwalkError(f"token id {token} is outside the vocabulary (0..{self.d_vocab - 1})")
            return token
        if isinstance(token, str):
            ids = self.to_tokens(token, prepend_bos=False)
            if ids.numel() != 1:
                pieces = self.to_str_tokens(ids)
                spaced = self.spaced_token_id(token)
                hint = (f"{' ' + token!r}, with the leading space a word after a space carries, is one "
                        f"token (id {spaced}): pass that" if spaced is not None else
                        "pass a single-token string (often with a leading space, e.g. ' Paris') or a token id")
                raise EmbedwalkError(f"{token!r} is {ids.numel()} tokens {pieces}, not one; {hint}")
            from embedwalk.inputs import refuse_unknown

            refuse_unknown(self, token, ids, what="token")
            return int(ids[0])
        raise EmbedwalkError(f"a token must be an int id or a one-token string, got {token!r}")

    def spaced_token_id(self, token: str) -> Optional[int]:
        """The id of ``" " + token`` when ``token`` does not start with whitespace and the spaced
        form is one token of its own (BPE vocabularies give a word after a space its own
        token, " Paris", distinct from "Paris"); None otherwise."""
        if not isinstance(token, str) or not token or token[0].isspace() or self.tokenizer is None:
            return None
        spaced = self.to_tokens(" " + token, prepend_bos=False)
        if spaced.numel() != 1:
            return None
        plain = self.to_tokens(token, prepend_bos=False)
        if plain.numel() == 1 and int(plain[0]) == int(spaced[0]):  # SentencePiece: the same token
            return None
        return int(spaced[0])

    def to_str_tokens(self, ids) -> list[str]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        tok = self.tokenizer
        if tok is None:
            return [f"<{i}>" for i in ids]
        return [tok.decode([i]) for i in ids]

    def __repr__(self) -> str:
        layouts = sorted({b.layout for b in self.blocks})
        return (
            f"ModelAdapter({type(self.model).__name__}, {self.architecture}, layers={self.n_layers}, "
            f"d_model={self.d_model}, heads={self.n_heads}, kv_heads={self.n_kv_heads}, vocab={self.d_vocab}, "
            f"blocks={'/'.join(layouts)})"
        )


class ReadoutParts:
    """The readout of :class:`ModelAdapter` as ``transform(normed(x) @ W_U + b_U)`` (see
    :meth:`ModelAdapter.readout_parts`, which verifies it), for logits a vocabulary block at a
    time."""

    def __init__(self, adapter: "ModelAdapter"):
        self._adapter = adapter
        self.W_U = adapter.W_U.detach()
        b = adapter.b_U
        self.b_U = None if b is None or not bool(b.detach().any()) else b.detach()

    def normed(self, x: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows d_model"]:
        """The final norm of each row (the model's own module), in the model's dtype."""
        return self._adapter.final_norm(x.to(self.W_U.dtype))

    def block(self, u: Float[Tensor, "rows d_model"], j0: int, j1: int, *, out: Optional[Tensor] = None) -> Tensor:
        """Logits ``[rows, j1 - j0]`` of vocabulary entries ``j0:j1`` from normed rows ``u``,
        float32 (float64 for a float64 model)."""
        W = self.W_U[:, j0:j1]
        z = torch.mm(u, W, out=out) if out is not None and u.dtype == out.dtype else torch.mm(u, W)
        return self._finish(z, slice(j0, j1))

    def entries(self, u: Float[Tensor, "rows d_model"], t: Int[Tensor, " rows"]) -> Float[Tensor, " rows"]:
        """The logit of entry ``t[i]`` of each normed row ``u[i]``, rounded to the model's dtype
        as its GEMM rounds it (a bfloat16 logit is coarse: a rank counted against an unrounded
        value would misplace every entry within one bfloat16 step)."""
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        z = (u.to(acc) * self.W_U[:, t].T.to(acc)).sum(-1).to(u.dtype)
        return self._finish(z[:, None], t[:, None])[:, 0]

    def _finish(self, z: Tensor, cols) -> Tensor:
        """Bias, output transform and float32 (float64) cast of logits ``z`` of entries ``cols``."""
        if self.b_U is not None:
            z += self.b_U[cols]  # in place: z is the GEMM's own output buffer
        z = self._adapter.output_transform(z) if self._adapter.output_scale != 1.0 else z
        return z if z.dtype in (torch.float32, torch.float64) else z.float()


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode inside the block; afterwards exactly the modules that were in
    training mode are switched back (``train(mode)`` on the root would reset a lone training
    submodule). Nothing is switched when nothing trains: ``eval()`` on the bridge walks ~10k
    modules (~40 ms), which hundreds of short runs would pay."""
    training = [m for m in _all_modules(model) if m.training]
    if training:
        model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _all_modules(model: torch.nn.Module):
    yield from model.modules()
    original = model.__dict__.get("original_model")  # the bridge's HF model sits outside its module tree
    if isinstance(original, torch.nn.Module):
        yield from original.modules()
