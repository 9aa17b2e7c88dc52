"""The identity of a model's weights: one fingerprint of every parameter and every buffer.

Store manifests, tuned lenses and concept fits record it (inside
:func:`embedwalk.store.manifest.model_identity`), and the adapter cache keys on it, so an
artefact of one model is never applied to, resumed with or mixed into another one, and
nothing the adapter derives from the weights (readout parts, biases, probe results) outlives
a change of them.

**What is hashed.** Every tensor of ``model.named_parameters()`` and ``model.named_buffers()``
(for a TL 4 bridge also those of the wrapped Hugging Face model, which sits outside the
bridge's module tree), each once however often it is shared (tied embeddings), under its
name (the bridge's ``._original_component`` hops removed). Buffers are included because
some carry the forward pass (rotary frequencies, ALiBi slopes, masks). Per tensor, the
bits of its values (16-bit floats widened to float32 first: the widening is exact, so a
bfloat16 checkpoint loaded in float32 keeps its fingerprint, while float32 weights rounded to
bfloat16 get another), seen as a ``[rows, columns]`` integer matrix, are summed along each
row and along each column with wrap-around integer arithmetic, on the tensor's own device.
Integer sums are exact and independent of summation order, so the fingerprint is the same
on every device and thread count. The row and column sums (a few KB) come to the host and
are hashed with SHA-256, together with the tensor's dtype class and shape, into a 64-bit
per-tensor digest; the model's fingerprint is the SHA-256 of all names and digests. Any
change of a single element changes its row sum and its column sum; a permutation of rows
(neurons) or of columns changes the order of the sums. It is a checksum, not a
cryptographic hash: an edit built to keep every row and column sum of a tensor would pass.

**Why this and what it costs.** The alternative, SHA-256 over all weight bytes, runs on the
host only (a GPU model would be copied off the device) at a few hundred MB/s per core;
version counters (``tensor._version``) cost nothing but miss ``param.data.copy_(...)`` and
``param.data[i] = x``, which do not bump them. The row/column sums read each weight once,
vectorised, with no copy for float32 and bfloat16 (bfloat16 bits widened to float32 are the
same bits times 2**16, so their int16 sums give the widened sums exactly; float16 is widened a
block of rows at a time); on the CPU each block of rows of ~256 KB is summed both ways
while it is in cache. Measured with ``time.perf_counter``, median of 5 (3 for the 1B forward
passes), torch 2.13 CPU, 1 thread, on the project's 2-core x86-64 machine (AVX-512, AMX):
SmolLM2-135M float32 0.12 s against 1.31 s for one forward pass of 4 x 128 tokens (9%); a
1.1B-parameter Llama shape (d_model 2048, 22 layers, 32000 vocab) float32 0.61 s against
7.4 s (8%), bfloat16 0.32 s against 1.7 s (19%: the CPU's bfloat16 matrix units make that
forward pass 4x faster, while the fingerprint, like any content check, must read every byte).
:func:`embedwalk.adapt` takes it once per call with a model (public functions adapt their
model once and hand the adapter on), so a public call pays it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = ["Fingerprint", "model_fingerprint", "fingerprint", "describe_difference", "ALGORITHM", "UNVERIFIED"]

ALGORITHM = "embedwalk-rowcol-v1"

#: What an artefact's repr says about a model identity written without a fingerprint.
UNVERIFIED = "model unverified: written before embedwalk fingerprinted the whole model"

# Elements of a float16 tensor widened to float32 at a time: 16 MB of float32 per block.
_BLOCK = 1 << 22
# Bytes of rows summed both ways at a time on the CPU (fits in L2).
_CACHE = 1 << 18


@dataclass(frozen=True)
class Fingerprint:
    """The fingerprint of a model: ``digest`` (SHA-256 hex of every tensor's name and digest),
    ``tensors`` (name -> 16-hex-digit digest, in the model's order) and ``unembed`` (the
    name of the tensor holding the unembedding, or None when none was found)."""

    digest: str
    tensors: dict = field(repr=False)
    unembed: Optional[str] = None

    def to_json(self) -> dict:
        return {"algorithm": ALGORITHM, "digest": self.digest, "tensors": dict(self.tensors), "unembed": self.unembed}

    @classmethod
    def from_json(cls, record) -> Optional["Fingerprint"]:
        """The fingerprint an artefact recorded, or None (none recorded: the model is unverified)."""
        if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM:
            return None
        return cls(str(record["digest"]), dict(record.get("tensors") or {}), record.get("unembed"))


def _canonical(t: Tensor) -> Tensor:
    """``t`` as a 2-D integer matrix of its value bits (see the module docstring)."""
    t = t.detach()
    if t.numel() == 0:
        t = t.reshape(0, 1)
    elif t.ndim == 0:
        t = t.reshape(1, 1)
    elif t.ndim == 1:
        t = t.reshape(1, -1)
    else:
        t = t.reshape(t.shape[0], -1)
    if t.dtype == torch.float32:
        return t.contiguous().view(torch.int32)
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16)  # summed as if widened, see _sums
    if t.dtype == torch.float64:
        return t.contiguous().view(torch.int64)
    if t.is_floating_point() or t.is_complex():
        return t  # widened a block of rows at a time in _sums
    return t.to(torch.int64)  # integer and bool buffers: small


def _sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column sums of ``x`` in its own integer width, wrapping (exact modulo 2**bits)."""
    if x.dtype not in (torch.int16, torch.int32, torch.int64):
        return _widened_sums(x)
    # On the CPU a block of rows of ~256 KB is summed both ways while it is in cache (1.5x
    # faster than two passes over the tensor); a GPU takes the tensor in one kernel each way.
    step = max(1, _CACHE // (x.shape[1] * x.element_size())) if x.device.type == "cpu" else max(1, x.shape[0])
    if x.shape[0] == 0:
        rows, cols = [x.sum(1, dtype=x.dtype)], x.sum(0, dtype=x.dtype)
    else:
        rows, cols = [], None
        for r0 in range(0, x.shape[0], step):
            part = x[r0 : r0 + step]
            rows.append(part.sum(1, dtype=x.dtype))
            c = part.sum(0, dtype=x.dtype)
            cols = c if cols is None else cols.add_(c)
    rows = torch.cat(rows) if len(rows) > 1 else rows[0]
    if x.dtype == torch.int16:
        # bfloat16 bits: widened to float32 they are the same bits times 2**16, so the widened
        # tensor's int32 sums are (int16 sums mod 2**16) * 2**16: the same numbers ~10x faster
        # than widening (which on a CPU with bfloat16 matrix units costs more than a forward).
        rows, cols = rows.to(torch.int32) * 65536, cols.to(torch.int32) * 65536
    return rows, cols


def _widened_sums(x: Tensor) -> tuple[Tensor, Tensor]:
    """float16 (and complex) values widened to float32 a block of rows at a time, then summed."""
    rows, cols = [], None
    step = max(1, _BLOCK // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], step):
        part = x[r0 : r0 + step]
        part = (torch.view_as_real(part).reshape(part.shape[0], -1) if part.is_complex() else part).float().view(torch.int32)
        rows.append(part.sum(1, dtype=torch.int32))
        c = part.sum(0, dtype=torch.int32)
        cols = c if cols is None else cols + c
    return torch.cat(rows), cols


def tensor_digest(t: Tensor) -> str:
    """The 16-hex-digit digest of one tensor (see the module docstring)."""
    x = _canonical(t)
    rows, cols = _sums(x)
    h = hashlib.sha256(f"{'f' if t.is_floating_point() else t.dtype}{tuple(t.shape)}".encode())
    for s in (rows, cols):
        h.update(s.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def named_tensors(model: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``model`` (and of a bridge's wrapped Hugging Face model),
    each once, under its name without the bridge's ``._original_component`` hops."""
    seen, out = set(), []
    roots = [("", model)]
    original = model.__dict__.get("original_model")  # the bridge's HF model sits outside its module tree
    if isinstance(original, torch.nn.Module):
        roots.append(("original_model.", original))
    for prefix, root in roots:
        for kind in (root.named_parameters(remove_duplicate=False), root.named_buffers(remove_duplicate=False)):
            for name, t in kind:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append(((prefix + name).replace("._original_component", ""), t))
    return out


def fingerprint(model: torch.nn.Module, unembedding: Optional[Tensor] = None) -> Fingerprint:
    """The :class:`Fingerprint` of ``model``'s parameters and buffers; ``unembedding`` (a
    tensor or a view of one) names which of them holds the unembedding.

    Cost: one read of every weight on its own device (figures in the module docstring)."""
    tensors: dict[str, str] = {}
    unembed = None
    ptr = None
    if isinstance(unembedding, Tensor):
        try:
            ptr = unembedding.untyped_storage().data_ptr()
        except RuntimeError:
            ptr = None
    for name, t in named_tensors(model):
        while name in tensors:  # two roots may name different tensors alike
            name += "'"
        tensors[name] = tensor_digest(t)
        if unembed is None and ptr is not None and t.untyped_storage().data_ptr() == ptr:
            unembed = name
    h = hashlib.sha256(ALGORITHM.encode())
    for name, d in tensors.items():
        h.update(f"{name}={d};".encode())
    return Fingerprint(h.hexdigest(), tensors, unembed)


def model_fingerprint(model) -> str:
    """The SHA-256 hex fingerprint of every parameter and buffer of ``model`` (a
    TransformerLens model or an :class:`~embedwalk.adapter.ModelAdapter`, whose fingerprint
    was taken when it was built). See the module docstring for what is hashed and the cost."""
    from embedwalk.adapter import ModelAdapter

    if isinstance(model, ModelAdapter):
        return model.fingerprint.digest
    if not isinstance(model, torch.nn.Module):
        raise EmbedwalkError(f"model_fingerprint takes a model or a ModelAdapter, got {type(model).__name__}")
    return fingerprint(model).digest


def describe_difference(old: Fingerprint, new: Fingerprint) -> str:
    """In words, how the model of fingerprint ``old`` differs from that of ``new``: which
    tensors changed, whether the unembedding is among them, or that the tensor names differ."""
    a, b = old.tensors, new.tensors
    if set(a) != set(b):
        only_old = [n for n in a if n not in b]
        only_new = [n for n in b if n not in a]
        return (f"the models hold different tensors ({len(a)} vs {len(b)}; only in the recorded one: "
                f"{only_old[:3] or 'none'}, only in this one: {only_new[:3] or 'none'}), e.g. another "
                "architecture or another TransformerLens generation")
    changed = [n for n in b if a[n] != b[n]]  # in the order of ``new`` (a JSON record is sorted)
    if not changed:
        return "the fingerprints differ although every tensor digest matches (a damaged record)"
    head = old.unembed if old.unembed in a else None
    if head is not None and head not in changed:
        what = "the unembedding matches but the body differs"
    elif head is not None:
        what = "the weights differ, the unembedding among them"
    else:
        what = "the weights differ"
    return f"{what}: {len(changed)} of {len(a)} tensors changed, first {changed[0]}"
