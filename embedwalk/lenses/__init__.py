"""Lenses: read the residual stream as it folds into the composite context vector.

Every lens is a :class:`embedwalk.run.Reader`, so any of them compose in one forward pass.
"""

from embedwalk.lenses.logit import LogitLensReader, LogitLensResult, default_chunk_size, logit_lens
from embedwalk.lenses.tuned import TunedLens, TunedLensTrainer, load_tuned_lens, train_tuned_lens

__all__ = [
    "LogitLensReader", "LogitLensResult", "default_chunk_size", "logit_lens",
    "TunedLens", "TunedLensTrainer", "load_tuned_lens", "train_tuned_lens",
]

# Sections 3-5 live in their own modules; export their function and result classes once they
# exist (result class names are taken from the module, so they need not be agreed here).
import importlib as _importlib

for _module, _func in (("walk", "walk_lens"), ("decompose", "decompose"), ("decoding", "decoding_walk")):
    try:
        _mod = _importlib.import_module(f"embedwalk.lenses.{_module}")
    except ModuleNotFoundError as _e:
        if _e.name != f"embedwalk.lenses.{_module}":
            raise  # the module exists but one of its imports is broken: say so
        continue
    _names = [_func] + [n for n in getattr(_mod, "__all__", dir(_mod)) if n.endswith("Result")]
    for _name in _names:
        if hasattr(_mod, _name):
            globals()[_name] = getattr(_mod, _name)
            __all__.append(_name)
del _importlib
