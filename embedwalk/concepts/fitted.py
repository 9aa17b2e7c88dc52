"""What a concept fit was fitted on: the model and the residual basis of its activations.

A probe, a ridge map or a set of moments is a function of activation vectors, and those
vectors mean something else in another residual basis (TransformerLens weight processing
centres the residual stream and folds norms, see :mod:`embedwalk.basis`) or in another
model. A fit computed from a model or from an activation store records the same identity
the store's manifest and a tuned lens record (:func:`embedwalk.store.manifest.model_identity`:
the model's name, sizes, the fingerprint of every parameter and buffer
(:mod:`embedwalk.fingerprint`) and the residual basis) in the JSON of its safetensors file,
and refuses to be applied to, or merged with, another one, naming what differs (e.g. the
unembedding matches but the body differs: a fine-tune with a frozen head, an edited model).

A fit from plain tensors, or one loaded from a file written before identities were recorded,
has the identity ``None`` ("unknown"): it is accepted everywhere (embedwalk cannot tell what
it was fitted on) and its repr says so. An identity written before embedwalk fingerprinted the
whole model (it records the unembedding's ``W_U_sha256`` only) names its model and basis, and
the basis is still checked, but the model is unverified: it is accepted on any model of that
width and basis (two such old records are still compared by their unembedding hash), and its
repr says "model unverified".
"""

from __future__ import annotations

from typing import Optional

from embedwalk.errors import EmbedwalkError

__all__ = ["identity_of", "check_same", "merged_identity", "describe_identity", "FITTED_IN_UNKNOWN"]

FITTED_IN_UNKNOWN = "an unknown model and residual basis (plain tensors, or a file from before embedwalk recorded them)"

# The fields whose difference changes what an activation vector means; the rest (class,
# generation, stored dtype) may differ between two loadings of the same weights. The model's
# weights are compared by fingerprint (store.manifest.model_mismatch).
_MEANING = ("d_model", "residual_basis")


def identity_of(source) -> Optional[dict]:
    """The identity of ``source``: a model (anything :func:`embedwalk.adapter.adapt` takes), an
    :class:`~embedwalk.store.ActivationStore` (its manifest's record), an identity dict, or
    None (unknown). Raises EmbedwalkError for a store written before identities were recorded."""
    if source is None or isinstance(source, dict):
        return source
    manifest = getattr(source, "manifest", None)
    if isinstance(manifest, dict) and "config" in manifest:
        ident = manifest["config"].get("model")
        if not isinstance(ident, dict) or "residual_basis" not in ident:
            return None  # a store from before bases were recorded: unknown, like an old fit file
        return ident
    from embedwalk.adapter import adapt
    from embedwalk.store.manifest import model_identity

    return model_identity(adapt(source))


def describe_identity(ident: Optional[dict]) -> str:
    """``'<model name> in <basis>'`` or the unknown phrase."""
    from embedwalk.basis import describe

    from embedwalk.fingerprint import UNVERIFIED
    from embedwalk.store.manifest import identity_verified

    if ident is None:
        return FITTED_IN_UNKNOWN
    return (f"{ident.get('name', '?')} (d_model={ident.get('d_model')}) in the {describe(ident['residual_basis'])} basis"
            + ("" if identity_verified(ident) else f" ({UNVERIFIED})"))


def _describe_model(ident: dict) -> str:
    from embedwalk.store.manifest import identity_verified

    if identity_verified(ident):
        return f"{ident.get('name', '?')} (d_model={ident.get('d_model')}, fingerprint {ident['fingerprint']['digest'][:12]}...)"
    sha = ident.get("W_U_sha256")
    return (f"{ident.get('name', '?')} (d_model={ident.get('d_model')}, unembedding SHA-256 "
            f"{sha[:12] + '...' if isinstance(sha, str) else sha}, model unverified)")


def check_same(fitted_in: Optional[dict], source, what: str, use: str) -> None:
    """Raise EmbedwalkError when ``source`` (model, store or identity) is known and is not the
    model and basis ``fitted_in`` records. ``what`` names the fit ('this LinearProbe'), ``use``
    the operation ('applied to'); either side unknown passes."""
    from embedwalk.store.manifest import identity_verified, model_mismatch

    now = identity_of(source)
    if fitted_in is None or now is None:
        return
    if all(fitted_in.get(k) == now.get(k) for k in _MEANING):
        if identity_verified(fitted_in) and identity_verified(now):
            why = model_mismatch(fitted_in, now)
        elif not identity_verified(fitted_in) and not identity_verified(now) and fitted_in.get("W_U_sha256") != now.get("W_U_sha256"):
            why = "their unembedding hash differs"  # two records from before fingerprints
        else:
            return  # one side unverified: embedwalk cannot tell, and the repr says so
        if why is None:
            return
        raise EmbedwalkError(
            f"{what} was fitted on {_describe_model(fitted_in)}, but is {use} {_describe_model(now)}: the models "
            f"differ ({why}), so activation vectors of one mean something else in the other. Refit on "
            "activations of this model, or use the model the fit was made on"
        )
    # Weight processing changes the unembedding too, so a basis difference is named first; with
    # the same basis (or another width) the weights themselves differ: another model.
    if fitted_in.get("d_model") == now.get("d_model") and fitted_in.get("residual_basis") != now.get("residual_basis"):
        raise EmbedwalkError(
            f"{what} was fitted on {describe_identity(fitted_in)}, but is {use} {describe_identity(now)}; "
            "the residual bases differ: TransformerLens weight processing (a bridge's enable_compatibility_mode(), "
            "HookedTransformer.from_pretrained's defaults) centres the residual stream and folds norms, and the "
            "centred residual has lost its mean, so no exact conversion exists. Use the model the fit was made "
            "on (e.g. the bridge without enable_compatibility_mode(), or "
            "HookedTransformer.from_pretrained_no_processing), or refit on activations of this one"
        )
    raise EmbedwalkError(
        f"{what} was fitted on {_describe_model(fitted_in)}, but is {use} {_describe_model(now)}: "
        "the models differ (their d_model differs), so activation vectors of one mean something else in the other. "
        "Refit on activations of this model, or use the model the fit was made on"
    )


def merged_identity(a: Optional[dict], b: Optional[dict], what: str) -> Optional[dict]:
    """The identity of the union of two statistics: refused when both are known and differ;
    with one side unknown the union is unknown (embedwalk cannot vouch for the unknown rows)."""
    from embedwalk.store.manifest import identity_verified

    if a is None or b is None:
        return None
    check_same(a, b, what, "merged with statistics of")
    return a if identity_verified(b) or not identity_verified(a) else b  # an unverified side stays visible
