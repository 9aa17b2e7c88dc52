"""Resume a forward pass at a layer from a residual computed earlier.

A swap at layer ``l`` leaves blocks ``0..l-1`` unchanged, so a sweep need not recompute
them: :class:`Resume` writes the original pass's residual at ``blocks.{l}.hook_resid_pre``,
which replaces whatever the earlier blocks produced, and runs those blocks as cheap
bypasses (:func:`skip_forwards`): their attention projects the values and applies the
output projection with ``z = 0`` (no queries, keys, scores or softmax) and their MLP returns
zeros. What reaches block ``l`` is exactly the stored residual, so the result equals the
full forward (up to float32 rounding of a different batch composition). The positions and
the attention mask are still computed by the model from the tokens, as in any forward.

TransformerLens 4.3's ``forward(start_at_layer=...)`` runs blocks ``0..l-1`` in full and
discards them, so it saves nothing; TL 3.9's computes no earlier block but is served by the
same mechanism here, one path for both generations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from embedwalk.adapter import ModelAdapter
from embedwalk.casting import cast_finite
from embedwalk.mixing import Bypass, _hook_points, mixing_forward
from embedwalk.run import Writer

__all__ = ["Resume", "skip_forwards"]

# MLP classes whose forward maps a hidden-state tensor to a tensor of the same shape (dense
# MLPs of TL 3.x and the TL 4 bridge); mixture-of-experts MLPs return router outputs too and
# are left to run.
_DENSE_MLPS = {"MLP", "GatedMLP", "MLPBridge", "GatedMLPBridge"}


def skip_forwards(adapter: ModelAdapter, layer: int) -> list[Bypass]:
    """Cheap forwards for block ``layer`` whose output is about to be discarded: attention with
    ``z = 0`` (through :func:`embedwalk.mixing.mixing_forward`, which knows each attention's
    return structure) and a zero MLP. Modules it cannot reproduce are left out (they run)."""
    out = []
    block = adapter.model.blocks[layer]
    n_heads, d_head = adapter.n_heads, adapter.d_head
    attn = mixing_forward(adapter, layer, lambda v: v.new_zeros(*v.shape[:2], n_heads, d_head))
    if attn is not None:
        out.append(attn)
    mlp = getattr(block, "mlp", None)
    if mlp is not None and type(mlp).__name__ in _DENSE_MLPS:

        def zero_mlp(hidden, *args, **kwargs):
            return torch.zeros_like(hidden)

        out.append(Bypass(mlp, zero_mlp, frozenset(_hook_points(mlp))))
    return out


class Resume(Writer):
    """Resume the forward at block ``layer`` from ``resid`` ``[batch, pos, d_model]``, the
    residual entering that block in an earlier pass over the same tokens; blocks before it run
    as :func:`skip_forwards` bypasses (where no other reader or writer watches them).

    ``resid`` is cast to the model's dtype; a wider residual with a value a 16-bit model cannot
    hold raises :class:`EmbedwalkError` naming row, position, dimension and value."""

    def __init__(self, layer: int, resid: Tensor):
        self.layer, self.resid = layer, resid

    def bypasses(self, adapter, *, watched, taken, ctx):
        return [b for l in range(self.layer) for b in skip_forwards(adapter, l)
                if b.module not in taken and not (b.silent & watched)]

    def hook_points(self, adapter):
        return [adapter.hook("resid_pre", self.layer)] if self.layer > 0 else []

    def write(self, name, value, ctx):
        # The residual of an earlier pass of this model is already its dtype (no check, no cost);
        # a wider one given from elsewhere must fit the model's 16-bit dtype.
        return cast_finite(
            self.resid.to(value.device), value.dtype, what=f"cannot resume at layer {self.layer} from this residual",
            locate=lambda idx: f"row {idx[0]}, position {idx[1]}, dimension {idx[2]}",
            fix="Pass the residual the model itself computed (its own dtype), or load the model in float32 or bfloat16",
        )
