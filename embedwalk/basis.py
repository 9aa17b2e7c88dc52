"""The residual basis a model's hook points live in, for artefacts fitted on them.

TransformerLens can process weights at load time (``HookedTransformer.from_pretrained``'s
defaults, a TL 4 bridge's ``enable_compatibility_mode()``): norms folded into the next
weights, writing weights centred so the residual stream has zero mean over ``d_model``, the
unembedding centred. The logits stay the model's, but residual vectors change (centring
drops their mean, which no linear map recovers), so a lens, probe or stored activation fitted
in one basis means something else in another. :func:`residual_basis` describes the basis from
the model itself: the bridge's own record of processing, TL 3's ``normalization_type``
(``LNPre``/``RMSPre`` after folding) and, for centring, the weights (a centred embedding has
rows of mean zero, a centred unembedding columns of mean zero: never so for trained weights).
"""

from __future__ import annotations

import torch

from embedwalk.adapter import adapt

__all__ = ["residual_basis", "RAW", "describe"]

RAW = {"processed": False, "folded_norms": False, "centred_residual": False, "centred_unembed": False}


def _centred(t: torch.Tensor, dim: int) -> bool:
    t = t.detach().float()
    return bool((t.mean(dim).abs() <= 1e-5 * t.abs().max().clamp_min(1e-30)).all())


def residual_basis(model) -> dict:
    """``{"processed", "folded_norms", "centred_residual", "centred_unembed"}`` (bools) for ``model``.

    ``processed`` is False only for a model whose residual stream is the Hugging Face model's
    own ``hidden_states`` (a raw bridge, a ``HookedTransformer`` loaded without processing).
    """
    adapter = adapt(model)
    m, cfg = adapter.model, adapter.cfg
    norm = str(getattr(cfg, "normalization_type", "") or "")
    folded = norm.endswith("Pre") or (adapter.generation == "bridge" and bool(getattr(m, "_weights_processed", False)))
    basis = {
        "folded_norms": folded,
        "centred_residual": _centred(adapter.W_E, -1),
        "centred_unembed": _centred(adapter.W_U, -1),
    }
    basis["processed"] = bool(
        any(basis.values()) or getattr(m, "_weights_processed", False) or getattr(m, "compatibility_mode", False)
    )
    return {k: basis[k] for k in RAW}


def describe(basis: dict) -> str:
    """A short human description: 'raw' or the processing steps."""
    if not basis.get("processed"):
        return "raw (the Hugging Face model's own residual stream)"
    steps = [name for key, name in (("folded_norms", "folded norms"), ("centred_residual", "centred residual"),
                                     ("centred_unembed", "centred unembedding")) if basis.get(key)]
    return "processed weights (" + (", ".join(steps) or "TransformerLens weight processing") + ")"
