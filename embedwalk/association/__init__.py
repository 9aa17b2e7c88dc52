"""Association bias: swap attention for uniform aggregation and measure what attention adds.

See ``swap`` (the writer), ``measure`` (per-head distances, self bias, downstream effects and
the sweep) and ``retrain`` (training the same architecture with uniform aggregation).
"""

from embedwalk.association.measure import (
    AssociationBias, AssociationReader, SwapEffect, SweepResult, association_bias, downstream, sweep,
)
from embedwalk.association.swap import UniformSwap, resolve_targets, uniform_pattern, uniform_z

__all__ = [
    "AssociationBias", "AssociationReader", "SwapEffect", "SweepResult", "UniformSwap",
    "association_bias", "downstream", "resolve_targets", "sweep", "uniform_pattern", "uniform_z",
]
