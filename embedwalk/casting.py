"""Casts to 16-bit (and stored) dtypes that never make a silent ``inf`` or NaN.

float16 holds magnitudes up to 65504 (``torch.finfo(torch.float16).max``); a wider value from
65520 on (65504 plus half of float16's step of 32 there, IEEE round-to-nearest) becomes
``inf`` when cast, with no word from torch. bfloat16 keeps float32's exponent range (largest
finite about 3.39e38) with 8 significant bits, so it overflows only near float32's own limit,
but the same check applies. Every place embedwalk casts a result to a 16-bit or caller-chosen
output dtype goes through :func:`cast_finite`, so the rule lives here once:

- a value the cast turns into ``inf`` is refused, naming where it is, its value, the dtype's
  largest finite value and the caller's fix (a wider dtype);
- a value that is already ``inf``/NaN before the cast is refused too, saying that it is not a
  precision problem of the cast (a wider dtype would keep it);
- underflow (a tiny value becoming subnormal or zero) is rounding, not an error.

Refusing rather than silently widening: a caller that needs a wider dtype chooses it, and an
output never changes dtype part-way (a store's shards would disagree on a hook's dtype).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from embedwalk.errors import EmbedwalkError

__all__ = ["SIXTEEN_BIT", "cast_finite", "finite_max"]

SIXTEEN_BIT = (torch.float16, torch.bfloat16)

SOURCE_FIX = (
    "find where it first appears: check the model's dtype (a float16 model overflows inside its own forward; "
    "load it in float32 or bfloat16), its weights and the inputs"
)


def finite_max(dtype: torch.dtype) -> float:
    """The largest finite value of a floating dtype (65504 for float16, about 3.39e38 for bfloat16)."""
    return float(torch.finfo(dtype).max)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _word(v: float) -> str:
    return "NaN" if v != v else f"{v:.9g}"  # 9 significant digits give a float32 back exactly


def _index(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def cast_finite(
    x: Tensor,
    dtype: torch.dtype,
    *,
    what: str,
    fix: str,
    locate: Optional[Callable[[tuple[int, ...]], str]] = None,
    source_fix: str = SOURCE_FIX,
    check: Optional[bool] = None,
) -> Tensor:
    """``x.to(dtype)``, refusing any value that is ``inf`` or NaN afterwards.

    Parameters:
        x: a tensor of any shape, in the caller's units.
        dtype: the output dtype.
        what: names the values, e.g. ``"hook blocks.0.hook_resid_post"``; the error starts with it.
        fix: how to avoid an overflow of the cast (e.g. pass ``dtype=torch.float32``); it ends the
            error when finite values overflowed.
        locate: maps the index (a tuple, one int per dimension of ``x``) of the first offending
            value in row-major order to words naming it, e.g. ``"prompt 3, position 2,
            dimension 17"``; by default the index itself.
        source_fix: ends the error when ``x`` itself held ``inf``/NaN (not a cast problem).
        check: whether to check; by default only when the cast narrows ``x`` to float16 or
            bfloat16 (a cast to the dtype ``x`` already has cannot make an ``inf``, so a round
            trip of a model's own 16-bit value costs nothing). ``True`` also checks ``x`` itself.

    Returns:
        ``x.to(dtype)`` (``x`` itself when it already has ``dtype``).

    Raises:
        EmbedwalkError: the result holds ``inf`` or NaN. The message names ``what``, the place,
        the value before the cast, how many values are affected and, for an overflow, the
        dtype's largest finite value and ``fix``. Costs one ``isfinite`` pass over the result
        (and, on an accelerator, one synchronisation); nothing more unless it raises.
    """
    y = x.to(dtype)
    if check is None:
        check = dtype in SIXTEEN_BIT and x.dtype != dtype
    if not check or not y.is_floating_point() or bool(torch.isfinite(y).all()):
        return y
    bad = ~torch.isfinite(y)
    first = int(bad.flatten().nonzero()[0, 0])
    idx = _index(first, tuple(y.shape))
    value = float(x.detach().flatten()[first])
    where = locate(idx) if locate is not None else f"index {list(idx)}"
    source_bad = ~torch.isfinite(x)
    n_source, n_bad = int(source_bad.sum()), int(bad.sum())
    if source_bad.flatten()[first]:
        raise EmbedwalkError(
            f"{what}: {where} is {_word(value)} already before the cast to {_name(dtype)} ({n_source} of "
            f"{x.numel()} values are inf or NaN in the {_name(x.dtype)} values themselves). This is not a "
            f"{_name(dtype)} range problem: a wider dtype would keep the {_word(value)}. {source_fix}"
        )
    largest = float(x.detach()[bad & ~source_bad].abs().max())
    raise EmbedwalkError(
        f"{what}: {where} is {_word(value)}, beyond {_name(dtype)}'s largest finite value "
        f"{finite_max(dtype):.6g}, so the cast to {_name(dtype)} would make it inf ({n_bad - n_source} of "
        f"{x.numel()} values overflow here, the largest {largest:.6g} in magnitude). {fix}"
    )
