"""Progress bars for long calls: one tqdm bar (with an ETA) per call, silenced by ``progress=False``.

A call made of several model passes (``multiple_choice``, ``train_tuned_lens``) opens one
bar for all of them with :func:`progress_scope`; every :func:`embedwalk.inputs.batches` inside
the scope advances that bar instead of opening its own, so the user sees a single ETA for the
whole call. Work that is not a model pass (ridge fits, training steps) counts its own units
with :func:`progress_bar`.

``progress=None`` (the default everywhere) shows the bar; ``False`` silences it and every
bar nested inside; ``True`` forces it.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, Optional

__all__ = ["progress_bar", "progress_scope", "ambient", "SILENT"]


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


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "embedwalk",
                 unit: str = "it", progress: Optional[bool] = None):
    """A tqdm bar (ETA included when ``total`` is known), or a silent stand-in when
    ``progress=False`` or an enclosing scope is silenced. Nested inside a visible scope, the
    bar is shown below it (tqdm positions it) and removed when done."""
    outer = _AMBIENT.get()
    if progress is False or outer is SILENT:
        return _NoBar(iterable)
    tqdm = _tqdm_class()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=outer is None, dynamic_ncols=True)


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
    showing bars of its own. ``progress=False`` silences everything inside."""
    outer = _AMBIENT.get()
    if outer is not None:  # already inside a scope: the outer bar keeps counting
        yield outer
        return
    bar = SILENT if progress is False else progress_bar(total=total, desc=desc, unit=unit, progress=True)
    token = _AMBIENT.set(bar)
    try:
        yield bar
    finally:
        _AMBIENT.reset(token)
        bar.close()
