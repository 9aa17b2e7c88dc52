"""Turn what a user passes (a string, strings, or token ids) into padded, masked batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from embedwalk.adapter import ModelAdapter
from embedwalk.errors import EmbedwalkError, EmbedwalkWarning

__all__ = ["Batch", "Inputs", "batches", "tokenize", "refuse_unknown", "require_device", "warn_if_spaced_likelier"]

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


def _unk_id(adapter: ModelAdapter) -> Optional[int]:
    """The tokenizer's unknown-token id when it is a token of its own (GPT-2's "unk" is its
    BOS/EOS, which a real text meets legitimately, so it does not count). A padding token that
    doubles as ``<unk>`` still counts: rows are checked before they are padded."""
    tok = adapter.tokenizer
    unk = getattr(tok, "unk_token_id", None) if tok is not None else None
    if unk is None:
        return None
    special = {getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id")}
    return None if unk in special else int(unk)


def refuse_unknown(adapter: ModelAdapter, text: str, ids: Tensor, what: str = "input text") -> None:
    """Raise when ``text`` became the unknown token: every lens would read ``<unk>``'s vector
    instead of the text (typical of word-level tokenizers given words outside their vocabulary)."""
    unk = _unk_id(adapter)
    if unk is None or not bool((ids == unk).any()):
        return
    unk_str = getattr(adapter.tokenizer, "unk_token", "<unk>")
    if unk_str and unk_str in text:  # the user wrote the unknown token on purpose
        return
    pieces = adapter.to_str_tokens(ids)
    raise EmbedwalkError(
        f"{what} {text[:60]!r} contains text this model's tokenizer does not know: it became "
        f"{unk_str!r} ({pieces[:12]}{' ...' if len(pieces) > 12 else ''}), so a lens would read the "
        "unknown token's vector instead. Use words from the model's vocabulary (a word-level "
        "test model knows only its own words, e.g. 'w5 w6') or a model with a subword tokenizer."
    )


def require_device(adapter: ModelAdapter, tensor: Tensor, what: str) -> None:
    """Refuse a user tensor whose values embedwalk cannot read or should not silently copy: one
    on ``meta`` (shapes without data) or on an accelerator other than the model's. CPU tensors
    are always fine: each batch is moved to the model's device."""
    dev, model_dev = tensor.device, torch.device(adapter.device)
    # "cuda" (the current device) and "cuda:0" count as the same device.
    same = dev.type == model_dev.type and (dev.index is None or model_dev.index is None or dev.index == model_dev.index)
    if dev.type == "cpu" or same:
        return
    why = ("a meta tensor has a shape but no values, so there are no token ids to read"
           if dev.type == "meta" else "it is neither on the CPU nor on the model's device")
    fix = ("build it with real values (e.g. adapter.to_tokens(text) or torch.tensor(ids))" if dev.type == "meta"
           else f"move it with .to({str(model_dev)!r}) or .cpu()")
    raise EmbedwalkError(f"{what} is on device {str(dev)!r} but the model is on {str(model_dev)!r}: {why}; {fix}")


def warn_if_spaced_likelier(adapter: ModelAdapter, token, logp: Tensor, where: str) -> None:
    """Warn when ``token`` is a string without a leading space whose spaced form is a token of
    its own that the model finds far likelier: ``token="Paris"`` where the model writes
    " Paris". ``logp`` is ``[rows, 2]``: the model's own next-token log-probs (or logits: only
    their difference counts) of the given and of the spaced token
    (:meth:`ModelAdapter.spaced_token_id`) at the positions concerned; the median over rows
    decides. A factor of 10 separates a choice from a slip: after a complete
    word the two forms of a word differ by orders of magnitude."""
    spaced = adapter.spaced_token_id(token) if isinstance(token, str) else None
    if spaced is None or logp.numel() == 0:
        return
    gap = float((logp[:, 1].double() - logp[:, 0].double()).median())
    if gap > math.log(10):
        import warnings

        warnings.warn(
            f"{where}={token!r} is token {adapter.token_id(token)}, which the model finds {math.exp(gap):.3g}x "
            f"less likely than {' ' + token!r} (token {spaced}, with the leading space a word after a space "
            f"carries); pass {where}={' ' + token!r} if you meant the word",
            EmbedwalkWarning,
            stacklevel=3,
        )


def _bos_alone(adapter: ModelAdapter, text: str, ids: Tensor) -> bool:
    """True when ``text`` tokenized to nothing but BOS tokens it did not spell out itself (the
    tokenizer dropped all of it: whitespace on a word-level model)."""
    tok = adapter.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is None or not bool((ids == bos).all()):
        return False
    bos_str = getattr(tok, "bos_token", None)
    return not (bos_str and bos_str in text)


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
        require_device(adapter, inputs, "the token ids")
        if attention_mask is not None:
            require_device(adapter, attention_mask, "attention_mask")
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
    empty = [i for i, s in enumerate(inputs) if s == ""]
    if empty:
        raise EmbedwalkError(
            f"input {empty[0]} is an empty string: it would be read as the BOS token alone, which "
            "says nothing about any text; drop empty prompts (or pass token ids if you really want "
            "BOS alone)"
        )
    rows = [adapter.to_tokens(s, prepend_bos=prepend_bos) for s in inputs]
    if any(len(r) == 0 for r in rows):
        raise EmbedwalkError("an input string tokenized to zero tokens; drop empty strings")
    bare = [i for i, (s, r) in enumerate(zip(inputs, rows)) if _bos_alone(adapter, s, r)]
    if bare:
        raise EmbedwalkError(
            f"input {bare[0]} ({inputs[bare[0]]!r}) tokenized to the BOS token alone (this "
            "tokenizer drops its text, e.g. whitespace on a word-level model), which says nothing "
            "about any text; drop such prompts (or pass token ids if you really want BOS alone)"
        )
    for s, r in zip(inputs, rows):
        refuse_unknown(adapter, s, r)
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
    """Yield batches of at most ``batch_size`` prompts, with a progress bar.

    Strings are tokenized one batch at a time so a long collection never sits in memory
    as a single padded tensor.

    The bar counts prompts and appears once the call has run
    :func:`embedwalk.progress.show_after` seconds, however many batches there are: while a
    batch is out, it is the current :class:`~embedwalk.progress.BatchWork`, which ``run`` and
    the readers advance as they work through it. Inside a
    :func:`~embedwalk.progress.progress_scope` the scope's bar is advanced instead.
    ``progress=False`` shows nothing; True shows the bar at once.

    Args:
        adapter: the model's :class:`ModelAdapter`.
        inputs: a string, a list of strings, or token ids ``[batch, pos]``.
        attention_mask: with token ids only: True (1) on real tokens.
        batch_size: prompts per batch.
        prepend_bos: passed to the tokenizer (None: the model's default).
        padding_side: "left" or "right" (None: the tokenizer's).
        progress: None (bar after the delay), True (at once) or False (none).
        desc: the bar's label.
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
    from embedwalk.progress import SILENT, BatchWork, ambient, current_work, progress_bar, set_work

    outer = ambient()
    if outer is not None:  # inside a call's own bar: advance it (or stay silent with it)
        bar = None if outer is SILENT or progress is False else outer
        owned = False
    else:
        # Every call has a bar, even of one batch: it stays hidden until the call has run
        # show_after() seconds, and the batch's share advances inside the batch.
        bar = None if progress is False else progress_bar(total=n, desc=desc, unit="prompt", progress=progress, fractional=True)
        owned = True
    enclosing = current_work()
    work = None
    try:
        for tokens, mask, start in source:
            prompt = torch.arange(start, start + tokens.shape[0])
            # Trim columns that are padding in every row of this batch.
            keep = mask.any(0)
            if not keep.all():
                tokens, mask = tokens[:, keep], mask[:, keep]
            work = BatchWork(bar, tokens.shape[0]) if bar is not None else None
            set_work(work)
            yield Batch(tokens, mask, prompt)
            if work is not None:
                work.finish()
    finally:
        # A generator left unfinished closes when collected, perhaps amid another call's
        # batches: hand back the enclosing share only if ours is still the current one.
        if current_work() is work:
            set_work(enclosing)
        if bar is not None and owned:
            bar.close()
