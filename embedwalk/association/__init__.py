"""Association bias: swap attention for uniform aggregation and measure what attention adds.

See ``swap`` (the writer), ``measure`` (per-head distances, self bias, downstream effects and
the sweep) and ``retrain`` (training the same architecture with uniform aggregation).
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.association.measure": [
        "AssociationBias", "AssociationReader", "SwapEffect", "SweepResult", "association_bias", "downstream", "sweep",
    ],
    "embedwalk.association.retrain": ["RetrainConfig", "RetrainResult", "retrain"],
    "embedwalk.association.swap": ["UniformSwap", "resolve_targets", "uniform_pattern", "uniform_z"],
})
