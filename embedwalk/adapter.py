"""The one place that knows how to talk to a TransformerLens model.

Both generations are served unmodified: a TL 4.x ``TransformerBridge`` (raw or after
``enable_compatibility_mode()``) and a TL 2.x/3.x ``HookedTransformer``. Everything else in
embedwalk asks this adapter for sizes, hook names, weights and the final readout, so a new
model family means a change here and nowhere else.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = ["ModelAdapter", "adapt"]

_ROW_BLOCK = 16

_ADAPTERS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelAdapter]" = weakref.WeakKeyDictionary()


def adapt(model) -> "ModelAdapter":
    """Return the (cached) adapter for ``model``; accepts an adapter too."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, torch.nn.Module):
        raise EmbedwalkError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}. Load one with embedwalk.load_model(...) or "
            "TransformerBridge.boot_transformers(...)."
        )
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = ModelAdapter(model)
        _ADAPTERS[model] = adapter
    return adapter


@dataclass(frozen=True)
class ReadoutPoint:
    """A named place on the residual stream: index 0 is the embedding, l+1 the output of block l."""

    index: int
    hook: str
    label: str


class ModelAdapter:
    """Sizes, hook names, weights and the final readout of a TransformerLens model."""

    def __init__(self, model: torch.nn.Module):
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
        self.generation = "bridge" if type(model).__name__ == "TransformerBridge" else "hooked"
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.n_heads: int = int(cfg.n_heads)
        self.d_head: int = int(getattr(cfg, "d_head", self.d_model // self.n_heads))
        self.n_kv_heads: int = int(getattr(cfg, "n_key_value_heads", None) or self.n_heads)
        self.d_vocab: int = int(self.W_U.shape[-1])
        self.has_pos_embed: bool = "hook_pos_embed" in hook_dict and self._is_learned_pos()
        self._check_hooks()
        self._check_readout()

    # ------------------------------------------------------------------ hook names
    def _is_learned_pos(self) -> bool:
        kind = getattr(self.cfg, "positional_embedding_type", "standard")
        return kind in ("standard", "shortformer")

    def _check_hooks(self) -> None:
        needed = ["hook_embed", self.final_resid_hook] + [
            self.hook(kind, layer)
            for layer in range(self.n_layers)
            for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pattern", "z")
        ]
        missing = [name for name in needed if name not in self.model.hook_dict]
        if missing:
            raise EmbedwalkError(
                f"{type(self.model).__name__} lacks hook points embedwalk needs: {missing[:6]}"
                f"{' ...' if len(missing) > 6 else ''}. embedwalk reads TransformerLens hook names "
                "(blocks.{l}.hook_resid_pre/mid/post, attn.hook_pattern/z, ...); use a "
                "TransformerBridge or HookedTransformer built by TransformerLens."
            )

    def _check_readout(self) -> None:
        if not hasattr(self.model, "ln_final") or self.model.ln_final is None:
            raise EmbedwalkError(
                "this model has no final norm (model.ln_final); embedwalk's lenses read the residual "
                "stream through final norm -> unembed, which this architecture does not use."
            )

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

    def readout_points(self, *, mid: bool = False) -> list[ReadoutPoint]:
        """The embedding, then each block's output (and, with ``mid``, each block's midpoint)."""
        points = [ReadoutPoint(0, self.hook("resid_pre", 0), "embed")]
        for layer in range(self.n_layers):
            if mid:
                points.append(ReadoutPoint(len(points), self.hook("resid_mid", layer), f"{layer}.mid"))
            points.append(ReadoutPoint(len(points), self.hook("resid_post", layer), str(layer)))
        return points

    # ------------------------------------------------------------------ weights
    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Optional[Float[Tensor, "d_vocab"]]:
        b = getattr(self.model, "b_U", None)
        return b if isinstance(b, Tensor) else None

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.model.W_E

    @property
    def W_pos(self) -> Optional[Float[Tensor, "n_ctx d_model"]]:
        return self.model.W_pos if self.has_pos_embed else None

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
        shape = x.shape
        flat = x.reshape(1, -1, shape[-1])  # TL norms expect [batch, pos, d_model]
        return self.model.ln_final(flat).reshape(shape)

    def readout(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits of any residual vector: the model's final norm, then its own unembed module.

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
        logits = self.model.unembed(self.model.ln_final(flat[None]))[0]
        return logits[:n].reshape(*shape[:-1], logits.shape[-1])

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
                raise EmbedwalkError(
                    f"{token!r} is {ids.numel()} tokens {pieces}, not one; pass a single-token "
                    "string (often with a leading space, e.g. ' Paris') or a token id"
                )
            from embedwalk.inputs import refuse_unknown

            refuse_unknown(self, token, ids, what="token")
            return int(ids[0])
        raise EmbedwalkError(f"a token must be an int id or a one-token string, got {token!r}")

    def to_str_tokens(self, ids) -> list[str]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        tok = self.tokenizer
        if tok is None:
            return [f"<{i}>" for i in ids]
        return [tok.decode([i]) for i in ids]

    def __repr__(self) -> str:
        return (
            f"ModelAdapter({type(self.model).__name__}, layers={self.n_layers}, d_model={self.d_model}, "
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, vocab={self.d_vocab})"
        )
