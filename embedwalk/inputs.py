"""Turn what a user passes (a string, strings, or token ids) into padded, masked batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from embedwalk.adapter import ModelAdapter
from embedwalk.errors import EmbedwalkError

__all__ = ["Batch", "Inputs", "batches", "tokenize"]

Inputs = Union[str, Sequence[str], Tensor]


@dataclass
class Batch:
    """One forward pass worth of prompts.

    ``mask`` is True on real tokens; pad positions are excluded from every metric and every
    written attention pattern. ``prompt`` holds each row's index in the user's collection.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    prompt: Int[Tensor, "batch"]

    @property
    def lengths(self) -> Int[Tensor, "batch"]:
        return self.mask.sum(-1)

    @property
    def last(self) -> Int[Tensor, "batch"]:
        """Position of each row's last real token, for either padding side."""
        pos = torch.arange(self.mask.shape[1], device=self.mask.device)
        return torch.where(self.mask, pos, -1).amax(-1)

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.mask.to(device), self.prompt)


def _pad(rows: list[Tensor], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        tokens[i, sl] = r
        mask[i, sl] = True
    return tokens, mask


def tokenize(
    adapter: ModelAdapter,
    inputs: Inputs,
    attention_mask: Optional[Tensor] = None,
    *,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids and a boolean mask for a string, a list of strings or a token tensor."""
    if isinstance(inputs, Tensor):
        tokens = inputs
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise EmbedwalkError(
                f"token ids must be an integer tensor [batch, pos], got dtype {tokens.dtype} and "
                f"shape {tuple(inputs.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= adapter.d_vocab):
            raise EmbedwalkError(
                f"token ids must lie in 0..{adapter.d_vocab - 1} (this model's vocabulary); "
                f"got values from {int(tokens.min())} to {int(tokens.max())}"
            )
        if attention_mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            if attention_mask.ndim == 1:
                attention_mask = attention_mask[None]
            if attention_mask.shape != tokens.shape:
                raise EmbedwalkError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have "
                    f"{tuple(tokens.shape)}; they must match"
                )
            mask = attention_mask.bool()
        if not mask.any(-1).all():
            raise EmbedwalkError("every row needs at least one real token; a row of the mask is all zero")
        return tokens.long().cpu(), mask.cpu()
    if attention_mask is not None:
        raise EmbedwalkError("attention_mask goes with token ids; for text, embedwalk builds the mask")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or not all(isinstance(s, str) for s in inputs):
        raise EmbedwalkError(
            "inputs must be a string, a list of strings, or a LongTensor of token ids [batch, pos]; "
            f"got {type(inputs).__name__}"
        )
    if len(inputs) == 0:
        raise EmbedwalkError("no inputs: pass at least one string")
    rows = [adapter.to_tokens(s, prepend_bos=prepend_bos) for s in inputs]
    if any(len(r) == 0 for r in rows):
        raise EmbedwalkError("an input string tokenized to zero tokens; drop empty strings")
    side = padding_side or getattr(adapter.tokenizer, "padding_side", "right") or "right"
    return _pad(rows, adapter.pad_token_id, side)


def batches(
    adapter: ModelAdapter,
    inputs: Inputs,
    attention_mask: Optional[Tensor] = None,
    *,
    batch_size: int = 8,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    progress: Optional[bool] = None,
    desc: str = "embedwalk",
) -> Iterator[Batch]:
    """Yield batches of at most ``batch_size`` prompts, with a progress bar when there are several.

    Strings are tokenized one batch at a time so a long collection never sits in memory
    as a single padded tensor.
    """
    if batch_size < 1:
        raise EmbedwalkError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(inputs, (str, Tensor)):
        tokens, mask = tokenize(adapter, inputs, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
        n = tokens.shape[0]
        chunks = [(tokens[i : i + batch_size], mask[i : i + batch_size], i) for i in range(0, n, batch_size)]
        source = iter(chunks)
    else:
        if attention_mask is not None:
            raise EmbedwalkError("attention_mask goes with token ids; for text, embedwalk builds the mask")
        if not hasattr(inputs, "__iter__"):
            raise EmbedwalkError(
                "inputs must be a string, a list of strings, or a LongTensor of token ids "
                f"[batch, pos]; got {type(inputs).__name__}"
            )
        texts = list(inputs)
        n = len(texts)
        if n == 0:
            raise EmbedwalkError("no inputs: pass at least one string")
        if not all(isinstance(s, str) for s in texts):
            bad = next(s for s in texts if not isinstance(s, str))
            raise EmbedwalkError(f"inputs must be strings; found a {type(bad).__name__}: {bad!r:.60}")

        def source_fn():
            for i in range(0, n, batch_size):
                t, m = tokenize(adapter, texts[i : i + batch_size], prepend_bos=prepend_bos, padding_side=padding_side)
                yield t, m, i

        source = source_fn()
    n_batches = -(-n // batch_size)
    show = (n_batches > 1) if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="prompt")
    try:
        for tokens, mask, start in source:
            prompt = torch.arange(start, start + tokens.shape[0])
            # Trim columns that are padding in every row of this batch.
            keep = mask.any(0)
            if not keep.all():
                tokens, mask = tokens[:, keep], mask[:, keep]
            yield Batch(tokens, mask, prompt)
            if bar is not None:
                bar.update(tokens.shape[0])
    finally:
        if bar is not None:
            bar.close()
