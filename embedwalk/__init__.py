"""embedwalk: read the embedding-space walk of TransformerLens models.

Lenses read the residual stream as it folds into the composite context vector; the
association-bias tools swap attention for uniform aggregation; the store and the concept
fitters test the concept-space theory; ``embedwalk.priority`` reproduces single-layer
attention mechanics. Everything attaches to one forward pass through :func:`run`.
"""

from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import ArchitectureError, EmbedwalkError
from embedwalk.inputs import Batch, batches, tokenize
from embedwalk.models import load_model
from embedwalk.run import Context, Reader, Writer, run
from embedwalk.lenses import (
    TunedLens, decompose, decoding_walk, load_tuned_lens, logit_lens, train_tuned_lens, walk_lens,
)
from embedwalk.association import UniformSwap, association_bias

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError", "Batch", "Context", "EmbedwalkError", "ModelAdapter", "Reader", "Writer",
    "adapt", "batches", "load_model", "run", "tokenize", "__version__",
    "logit_lens", "TunedLens", "train_tuned_lens", "load_tuned_lens", "walk_lens", "decompose",
    "decoding_walk", "UniformSwap", "association_bias",
]
