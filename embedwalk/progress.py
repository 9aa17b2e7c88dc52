"""Progress bars for long calls: one tqdm bar (with an ETA) per call, silenced by ``progress=False``.

Every call opens its bar, but the bar stays hidden until the call has run for
:func:`show_after` seconds (5 s, or ``EMBEDWALK_PROGRESS_DELAY``): quick calls print nothing,
and a slow one shows a bar whatever its number of batches. For the ETA to mean something in a
call of one long batch, the bar advances *inside* each batch: :func:`embedwalk.inputs.batches`
gives every batch its share of the bar (its prompts, a :class:`BatchWork`), ``run`` advances
that share as the forward pass fires its hook points, and readers whose ``end_batch`` does the
heavy work (the logit lens's readout, the walk's nearest tokens) report it with
:func:`advance`. Counts are therefore fractional ("3.4/7 prompt").

A call made of several model passes (``multiple_choice``, ``train_tuned_lens``) opens one
bar for all of them with :func:`progress_scope`; every :func:`embedwalk.inputs.batches` inside
the scope advances that bar instead of opening its own, so the user sees a single ETA for the
whole call. Work that is not a model pass (ridge fits, training steps) counts its own units
with :func:`progress_bar`.

``progress=None`` (the default everywhere) shows the bar; ``False`` silences it and every
bar nested inside; ``True`` forces it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, Optional

from embedwalk.errors import EmbedwalkError

__all__ = ["progress_bar", "progress_scope", "ambient", "SILENT", "show_after", "advance", "stage", "BatchWork",
           "current_work", "set_work"]

DELAY_ENV = "EMBEDWALK_PROGRESS_DELAY"
DEFAULT_DELAY = 5.0
# Prompt counts advance by fractions of a batch, so they are shown with one decimal.
PROMPT_FORMAT = "{l_bar}{bar}| {n:.1f}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    n = 0

    def __init__(self, iterable: Optional[Iterable] = None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


SILENT = _NoBar()
_AMBIENT: ContextVar = ContextVar("embedwalk_progress", default=None)


def ambient():
    """The bar of the enclosing :func:`progress_scope` (``SILENT`` when it is silenced), or None."""
    return _AMBIENT.get()


def show_after(progress: Optional[bool] = None) -> float:
    """Seconds a call runs before its bar appears: 0 for ``progress=True``, otherwise
    ``EMBEDWALK_PROGRESS_DELAY`` (default 5)."""
    if progress is True:
        return 0.0
    raw = os.environ.get(DELAY_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_DELAY
    try:
        delay = float(raw)
    except ValueError:
        delay = float("nan")
    if not delay >= 0:  # also refuses nan
        raise EmbedwalkError(
            f"{DELAY_ENV}={raw!r} is not a number of seconds >= 0; set it to e.g. 0 (bars at once) "
            f"or 5 (the default), or unset it"
        )
    return delay


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "embedwalk",
                 unit: str = "it", progress: Optional[bool] = None, fractional: bool = False, **tqdm_kwargs):
    """A tqdm bar (ETA included when ``total`` is known), or a silent stand-in when
    ``progress=False`` or an enclosing scope is silenced.

    Args:
        iterable: what to iterate over, or None for a bar advanced with ``update``.
        total: the number of units, for the percentage and the ETA.
        desc: the bar's label.
        unit: what one unit is ("prompt", "token", ...).
        progress: None shows the bar once the call has run :func:`show_after` seconds;
            True shows it at once; False returns a silent stand-in.
        fractional: the count advances by fractions of a unit (a batch's share advanced
            within the batch), so it is shown with one decimal.
        tqdm_kwargs: passed to tqdm (e.g. ``initial``).

    Nested inside a visible scope, the bar is shown below it (tqdm positions it) and removed
    when done."""
    outer = _AMBIENT.get()
    if progress is False or outer is SILENT:
        return _NoBar(iterable)
    tqdm = _tqdm_class()
    if fractional:
        tqdm_kwargs.setdefault("bar_format", PROMPT_FORMAT)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=outer is None, dynamic_ncols=True,
                delay=show_after(progress), **tqdm_kwargs)


def _tqdm_class():
    """tqdm's notebook widget where ipywidgets is installed, its text bar otherwise (tqdm.auto
    would warn "IProgress not found" in every notebook without ipywidgets)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


@contextmanager
def progress_scope(total: int, desc: str, *, unit: str = "prompt", progress: Optional[bool] = None) -> Iterator:
    """One bar of ``total`` ``unit`` for a call made of several passes: inside the scope,
    :func:`embedwalk.inputs.batches` advances it by the prompts of each batch instead of
    showing bars of its own, and each batch's share advances within the batch. Like every
    bar it appears once the call has run :func:`show_after` seconds (``progress=True``: at
    once); ``progress=False`` silences everything inside."""
    outer = _AMBIENT.get()
    if outer is not None:  # already inside a scope: the outer bar keeps counting
        yield outer
        return
    bar = SILENT if progress is False else progress_bar(total=total, desc=desc, unit=unit, progress=progress, fractional=True)
    token = _AMBIENT.set(bar)
    try:
        yield bar
    finally:
        _AMBIENT.reset(token)
        bar.close()


_WORK: ContextVar = ContextVar("embedwalk_batch_work", default=None)


class BatchWork:
    """One batch's share of a bar (its ``rows`` prompts), advanced as the batch's work is done.

    The batch's work runs in stages (the forward pass, then the readers' ``end_batch``); a
    stage owns the fractions ``lo..hi`` of the batch, and :meth:`advance` maps the stage's own
    count onto them. The share only grows; :meth:`finish` completes it.
    """

    def __init__(self, bar, rows: int):
        self.bar, self.rows = bar, rows
        self.done, self.lo, self.hi = 0.0, 0.0, 1.0

    def stage(self, lo: float, hi: float) -> None:
        """Let the next :meth:`advance` calls fill fractions ``lo..hi`` of this batch."""
        self.lo, self.hi = max(lo, self.done), max(hi, self.done)

    def advance(self, done: float, total: float) -> None:
        """``done`` of the current stage's ``total`` units are complete."""
        f = self.lo + (self.hi - self.lo) * min(1.0, done / total if total > 0 else 1.0)
        if f > self.done:
            self._update(self.rows * (f - self.done))
            self.done = f

    def _update(self, amount: float) -> None:
        # Summed fractions can pass the total by a rounding error, which tqdm clamps with a
        # warning: never step past it.
        total, n = getattr(self.bar, "total", None), getattr(self.bar, "n", 0)
        if total is not None:
            amount = min(amount, max(0.0, total - n))
        self.bar.update(amount)

    def finish(self) -> None:
        if self.done < 1.0:
            self._update(self.rows * (1.0 - self.done))
            self.done = 1.0
        n = getattr(self.bar, "n", 0)
        if isinstance(n, float) and abs(n - round(n)) < 1e-6:  # summed fractions: whole again
            self.bar.n = round(n)


def current_work() -> Optional[BatchWork]:
    """The share of the batch being processed, or None outside a visible batch."""
    return _WORK.get()


def set_work(work: Optional[BatchWork]) -> None:
    """Make ``work`` the current batch's share (None: nothing to advance)."""
    _WORK.set(work)


def stage(lo: float, hi: float) -> None:
    """The current batch's next progress reports fill fractions ``lo..hi`` of it (a no-op
    outside a visible batch)."""
    work = _WORK.get()
    if work is not None:
        work.stage(lo, hi)


def advance(done: float, total: float) -> None:
    """Report that ``done`` of ``total`` units of the current stage of the current batch are
    complete (a no-op outside a visible batch). Readers call it from long ``end_batch`` work."""
    work = _WORK.get()
    if work is not None:
        work.advance(done, total)
