"""The architecture matrix: every tiny family x mode x capability, against the HF model itself.

Shared by ``tests/test_architectures.py`` and ``scripts/architectures_table.py`` (which writes
the README table from the same cells). A cell is a function ``check(case) -> float`` that
returns the largest gap between embedwalk and an independent computation on a pristine copy
of the Hugging Face model (log-probs, or residual vectors relative to their size), or raises
``ArchitectureError`` when embedwalk refuses. ``expected_refusal(case, capability)`` says,
from the HF config alone, which cells must be refused; every other cell must be exact.

More capabilities (e.g. the uniform swap and association measures) are added by appending to
:data:`CAPABILITIES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from embedwalk.testing import FAMILIES, matrix_case, matrix_modes


@functools.lru_cache(maxsize=None)
def tolerance(family: str, mode: str) -> float:
    """What a correct cell may differ from the HF model by (tests/tolerance.py): embedwalk on
    TransformerLens and the pristine HF model are two float computations of the same forward.
    Residual gaps are relative to the residual's size (:func:`tolerance.resid_rel`); log-prob
    gaps get the readout's rounding of the HF model's own states, with those states moved by
    that relative amount (:func:`tolerance.logprob_tol`). A cell returns the larger kind of gap,
    so it is held to the larger of the two."""
    from embedwalk import adapt
    from tolerance import logprob_tol, resid_rel

    c = case(family, mode)
    a = adapt(c.model)
    rel_tol = resid_rel(a)
    lp_tol = 0.0
    for p in range(len(PROMPTS)):
        states, lp, _, mids = hf_run(c.family, p)
        points = list(states) + (list(mids) if mids is not None else [])
        for x in points:
            x = x.to(a.dtype)
            lp_tol = max(lp_tol, logprob_tol(a, x, hf_readout(c.hf, x), resid_rel=rel_tol))
    return max(rel_tol, lp_tol)


CASES = [(f, m) for f in FAMILIES for m in matrix_modes(f)]

# Two prompts of different lengths (token ids; id 1 is BOS), padded with id 0 on either side.
PROMPTS = [[1, 5, 17, 99, 3, 150, 42, 7, 8], [1, 12, 190, 14, 15, 61]]


@dataclass
class Case:
    family: str
    mode: str
    model: object
    hf: object

    @property
    def parallel(self) -> bool:
        """From the HF config: attention and MLP side by side on the same input."""
        c = self.hf.config
        return bool(getattr(c, "use_parallel_residual", False) or getattr(c, "parallel_attn", False)
                    or c.model_type in ("gptj", "phi", "cohere"))


@functools.lru_cache(maxsize=None)
def case(family: str, mode: str) -> Case:
    model, hf = matrix_case(family, mode)
    return Case(family, mode, model, hf)


# ---------------------------------------------------------------------------- HF reference
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm", "model.layer_norm")


def hf_final_norm(hf):
    for path in _FINAL_NORMS:
        mod = hf
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise AssertionError(f"no final norm found on {type(hf).__name__}")


def hf_transform(hf, logits):
    """The HF model's own post-unembedding transform, written from its config."""
    c = hf.config
    if getattr(c, "final_logit_softcapping", None):
        logits = c.final_logit_softcapping * torch.tanh(logits / c.final_logit_softcapping)
    if c.model_type == "granite":
        logits = logits / c.logits_scaling
    if c.model_type == "cohere":
        logits = logits * c.logit_scale
    return logits


def hf_readout(hf, h):
    """Log-probs of residual vectors ``h`` [..., d] through the HF model's own output path."""
    with torch.no_grad():
        return hf_transform(hf, hf.get_output_embeddings()(hf_final_norm(hf)(h))).log_softmax(-1)


# The HF submodule of a sequential decoder layer whose input is resid_mid (the residual after
# attention): the MLP's pre-norm, or the MLP itself where there is none (OLMo-2).
_MID_INPUT = {"gpt2": "ln_2", "gpt_neo": "ln_2", "opt": "final_layer_norm", "xglm": "final_layer_norm",
              "gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm", "olmo2": "mlp"}


def hf_layers(hf):
    n = hf.config.num_hidden_layers
    for mod in hf.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise AssertionError(f"no decoder layer list on {type(hf).__name__}")


@functools.lru_cache(maxsize=None)
def hf_run(family: str, prompt: int):
    """HF quantities of one unpadded prompt: states ``[resid_pre(0..L-1), final resid_post]``
    [L+1, pos, d], log-probs [pos, vocab], attention patterns, and ``mids`` (resid_mid of
    each layer [L, pos, d], None for parallel blocks), read with hooks on the HF modules."""
    c = case(family, matrix_modes(family)[0])
    hf = c.hf
    ids = torch.tensor([PROMPTS[prompt]])
    final, mids = {}, {}
    handles = [hf_final_norm(hf).register_forward_pre_hook(lambda m, a: final.__setitem__("x", a[0].detach()))]
    if not c.parallel:
        name = _MID_INPUT.get(family, "post_attention_layernorm")
        for l, layer in enumerate(hf_layers(hf)):
            handles.append(getattr(layer, name).register_forward_pre_hook(
                lambda m, a, l=l: mids.__setitem__(l, a[0].detach())))
    try:
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    states = torch.stack([h[0] for h in out.hidden_states[:-1]] + [final["x"][0]])
    # (OPT flattens [batch, pos] before that norm; batch is 1 here)
    mid = torch.stack([mids[l].reshape(ids.shape[1], -1) for l in sorted(mids)]) if mids else None
    return states, out.logits[0].log_softmax(-1), out.attentions, mid


def padded(side: str):
    n = max(len(p) for p in PROMPTS)
    toks = torch.zeros(len(PROMPTS), n, dtype=torch.long)
    mask = torch.zeros(len(PROMPTS), n, dtype=torch.bool)
    for i, p in enumerate(PROMPTS):
        sl = slice(0, len(p)) if side == "right" else slice(n - len(p), n)
        toks[i, sl] = torch.tensor(p)
        mask[i, sl] = True
    return toks, mask


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / (1e-6 + b.abs().max()))


def centred(x, c: Case):
    """Compatibility mode centres the residual of LayerNorm models (a change the final norm
    undoes); in that mode residuals are compared modulo their mean."""
    return x - x.mean(-1, keepdim=True) if c.mode == "compat" else x


# ---------------------------------------------------------------------------- capabilities
def check_nonvacuous(c: Case) -> float:
    """The comparisons below mean something: attention far from uniform, norms not at 1/0."""
    _, _, att, _ = hf_run(c.family, 0)
    n = att[0].shape[-1]
    causal = torch.tril(torch.ones(n, n))
    uniform = causal / causal.sum(-1, keepdim=True)
    tv = max(float((a[0] - uniform).abs().sum(-1).mean() / 2) for a in att)
    assert tv > 0.15, f"{c.family}: attention is nearly uniform (mean TV distance {tv:.3f})"
    w = getattr(hf_final_norm(c.hf), "weight", None)
    if w is not None:  # OLMo's LayerNorm has no parameters
        assert float(w.detach().std()) > 0.1, f"{c.family}: final norm weights are not random"
    return 0.0


def _lens_gap(c: Case, mid: bool) -> float:
    from embedwalk import logit_lens

    gap = 0.0
    for side in ("left", "right"):
        toks, mask = padded(side)
        r = logit_lens(c.model, toks, attention_mask=mask, mid=mid, progress=False)
        for j, label in enumerate(r.labels):
            if label.endswith(".mid"):
                continue  # checked in check_mid against the walk's midpoint
            idx = 0 if label == "embed" else int(label) + 1
            for row in range(len(r.prompt)):
                p, pos = int(r.prompt[row]), int(r.pos[row])
                if pos + 1 >= len(PROMPTS[p]):
                    continue
                states, _, _, _ = hf_run(c.family, p)
                ref = hf_readout(c.hf, states[idx, pos])[PROMPTS[p][pos + 1]]
                gap = max(gap, abs(float(r.target_logprob[j, row]) - float(ref)))
    return gap


def check_logit_lens(c: Case) -> float:
    """Every readout of both padded batches = the HF readout of the HF hidden state."""
    return _lens_gap(c, mid=False)


def check_final_readout(c: Case) -> float:
    """The final readout is the model's own output: HF log-probs."""
    from embedwalk import logit_lens

    toks, mask = padded("left")
    r = logit_lens(c.model, toks, attention_mask=mask, positions="last", readouts=[-1], progress=False)
    gap = 0.0
    for row in range(len(r.prompt)):
        p = int(r.prompt[row])
        _, lp, _, _ = hf_run(c.family, p)
        gap = max(gap, abs(float(r.top_probs[0, row, 0]) - float(lp[-1].exp().max())))
    return gap


def check_mid(c: Case) -> float:
    """Mid readouts = the HF readout of HF's own resid_mid (the input of its MLP side)."""
    from embedwalk import logit_lens

    toks = torch.tensor([PROMPTS[0]])
    r = logit_lens(c.model, toks, mid=True, positions=[3], targets=PROMPTS[0][4], progress=False)
    _, _, _, mids = hf_run(c.family, 0)
    gap = 0.0
    for j, label in enumerate(r.labels):
        if label.endswith(".mid"):
            ref = hf_readout(c.hf, mids[int(label.split(".")[0]), 3])[PROMPTS[0][4]]
            gap = max(gap, abs(float(r.target_logprob[j, 0]) - float(ref)))
    return gap


def check_walk(c: Case) -> float:
    """Walk states at block outputs = HF hidden states; pre + attention + MLP = post; the
    nearest-token probabilities = HF readouts."""
    from embedwalk import walk_lens

    toks, mask = padded("left")
    w = walk_lens(c.model, toks, attention_mask=mask, positions=None, progress=False)
    gap = 0.0
    for row in range(len(w.prompt)):
        p, pos = int(w.prompt[row]), int(w.pos[row])
        states, _, _, _ = hf_run(c.family, p)
        for l in range(states.shape[0]):
            k = 0 if l == 0 else 2 * l
            gap = max(gap, rel(centred(w.states[row, k], c), centred(states[l, pos], c)))
        _, _, _, mids = hf_run(c.family, p)
        if mids is not None:  # the aggregation step of each block = HF's own
            for l in range(mids.shape[0]):
                gap = max(gap, rel(centred(w.states[row, 2 * l + 1], c), centred(mids[l, pos], c)))
        ref = hf_readout(c.hf, states[-1, pos]).exp()
        gap = max(gap, abs(float(w.unembed_probs[row, -1, 0]) - float(ref.max())))
    gap = max(gap, float(w.rest_norm.max() / w.states.norm(dim=-1).max()))
    return gap


def check_decompose(c: Case, stage: str, layer: int) -> float:
    """Parts add up to the residual; the residual is HF's; the DLAs add up to the logit."""
    from embedwalk import decompose

    toks = torch.tensor([PROMPTS[0]])
    r = decompose(c.model, toks, layer=layer, stage=stage, position=-2)
    states, lp, _, mids = hf_run(c.family, 0)
    gap = r.relative_error
    gap = max(gap, abs(r.dla_total - r.pre_transform_logit) / (1 + abs(r.pre_transform_logit)))
    L = states.shape[0] - 1
    idx = {"pre": layer, "post": layer + 1}.get(stage)
    if idx is not None and idx <= L:
        gap = max(gap, rel(centred(r.residual, c), centred(states[idx, -2], c)))
    if stage == "mid":
        gap = max(gap, rel(centred(r.residual, c), centred(mids[layer, -2], c)))
    if mids is not None:
        # each layer's heads (+ biases) are its real attention contribution: HF mid - HF pre
        for l in range(layer + (0 if stage == "pre" else 1)):
            idx_l = [i for i, k in enumerate(r.kinds) if r.part_layers[i] == l and k in ("head", "attn_bias", "attn_norm_bias")]
            got = r.parts[idx_l].double().sum(0)
            gap = max(gap, rel(centred(got, c), centred(mids[l, -2] - states[l, -2], c)))
    if stage == "post" and layer == L - 1:
        # the model's own logit, as a log-prob (compatibility mode shifts logits per position)
        own = hf_readout(c.hf, r.residual.to(c.hf.dtype))[r.token]
        gap = max(gap, abs(float(own) - float(lp[-2, r.token])))
    if c.hf.config.model_type in ("gemma2", "gemma3", "olmo2", "granite"):
        assert "attn_bias" not in r.kinds, "an attention-bias part on a model without attention bias"
    return gap


def check_decoding(c: Case) -> float:
    """Greedy decoding follows HF's argmax; the final readout's KL to the output is 0."""
    from embedwalk import decoding_walk

    d = decoding_walk(c.model, torch.tensor(PROMPTS[1]), max_new_tokens=2, stop_at_eos=False)
    _, lp, _, _ = hf_run(c.family, 1)
    gap = float(d.lens_kl[:, -1].abs().max())
    gap = max(gap, abs(float(d.logprob[0]) - float(lp[-1].max())))
    assert int(d.chosen[0]) == int(lp[-1].argmax())
    return gap


def check_store(c: Case, tmp: str, mid: bool) -> float:
    """The store's resid_post / attn_out / mlp_out (and resid_mid) = HF's residual stream."""
    from embedwalk.store import cache_activations

    hooks = ["attn_out.0", "mlp_out.0", "resid_post.0"] + (["resid_mid.0"] if mid else [])
    store = cache_activations(c.model, torch.tensor([PROMPTS[0]]), f"{tmp}/{c.family}-{c.mode}-{mid}",
                              hooks=hooks, dtype="float32", progress=False)
    names = [store.resolve([h])[0] for h in hooks]
    got = store.get(slice(0, len(PROMPTS[0])), names).stack(names)  # [pos, hook, d]
    states, _, _, _ = hf_run(c.family, 0)
    gap = rel(centred(got[:, 2], c), centred(states[1], c))
    gap = max(gap, rel(centred(states[0] + got[:, 0] + got[:, 1], c), centred(states[1], c)))
    if mid:
        _, _, _, mids = hf_run(c.family, 0)
        gap = max(gap, rel(centred(got[:, 3], c), centred(mids[0], c)))
    return gap


#: capability name -> (check(case, tmp) -> gap, refused(case) -> reason or None)
CAPABILITIES: dict[str, tuple[Callable, Callable[[Case], Optional[str]]]] = {
    "logit lens (left+right padding)": (lambda c, tmp: check_logit_lens(c), lambda c: None),
    "final readout": (lambda c, tmp: check_final_readout(c), lambda c: None),
    "mid readouts": (lambda c, tmp: check_mid(c), lambda c: "parallel block: no resid_mid" if c.parallel else None),
    "decompose pre": (lambda c, tmp: check_decompose(c, "pre", 1), lambda c: None),
    "decompose mid": (lambda c, tmp: check_decompose(c, "mid", 1), lambda c: "parallel block: no resid_mid" if c.parallel else None),
    "decompose post": (lambda c, tmp: check_decompose(c, "post", 1), lambda c: None),
    "decompose L0 post": (lambda c, tmp: check_decompose(c, "post", 0), lambda c: None),
    "walk_lens": (lambda c, tmp: check_walk(c), lambda c: None),
    "decoding_walk": (lambda c, tmp: check_decoding(c), lambda c: None),
    "store": (lambda c, tmp: check_store(c, tmp, False), lambda c: None),
    "store resid_mid": (lambda c, tmp: check_store(c, tmp, True), lambda c: "parallel block: no resid_mid" if c.parallel else None),
}


# The uniform swap and association columns (scope of tests/architectures_association.py).
from architectures_association import ASSOCIATION  # noqa: E402

CAPABILITIES.update(ASSOCIATION)


def run_cell(family: str, mode: str, capability: str, tmp: str):
    """``("exact", gap)`` or ``("refused", message)``; raises AssertionError when the cell is
    neither exact nor refused as expected (a silently wrong number, or a wrong refusal)."""
    from embedwalk.errors import ArchitectureError

    c = case(family, mode)
    check, refused = CAPABILITIES[capability]
    reason = refused(c)
    try:
        gap = check(c, tmp)
    except ArchitectureError as e:
        msg = str(e)
        assert reason is not None, f"{family}/{mode}/{capability} refused unexpectedly: {msg}"
        from embedwalk import adapt

        assert adapt(c.model).architecture in msg, f"refusal does not name the architecture: {msg}"
        return "refused", msg
    assert reason is None, f"{family}/{mode}/{capability} should be refused ({reason}) but returned gap {gap:.3g}"
    tol = tolerance(family, mode)
    assert gap <= tol, f"{family}/{mode}/{capability}: embedwalk differs from the HF model by {gap:.3g} (tolerance {tol:.3g})"
    return "exact", gap
