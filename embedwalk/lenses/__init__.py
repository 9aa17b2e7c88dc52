"""Lenses: read the residual stream as it folds into the composite context vector.

Every lens is a :class:`embedwalk.run.Reader`, so any of them compose in one forward pass.
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.lenses.logit": ["LogitLensReader", "LogitLensResult", "default_chunk_size", "logit_lens"],
    "embedwalk.lenses.tuned": ["TunedLens", "TunedLensTrainer", "load_tuned_lens", "train_tuned_lens"],
    "embedwalk.lenses.walk": ["walk_lens", "WalkResult"],
    "embedwalk.lenses.decompose": ["decompose", "DecompositionResult"],
    "embedwalk.lenses.decoding": ["decoding_walk", "DecodingWalk"],
})
