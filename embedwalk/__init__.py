"""embedwalk: read the embedding-space walk of TransformerLens models.

Lenses read the residual stream as it folds into the composite context vector; the
association-bias tools swap attention for uniform aggregation; the store and the concept
fitters test the concept-space theory; ``embedwalk.priority`` reproduces single-layer
attention mechanics. Everything attaches to one forward pass through :func:`run`.
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.adapter": ["ModelAdapter", "adapt"],
    "embedwalk.errors": ["ArchitectureError", "EmbedwalkError", "EmbedwalkWarning"],
    "embedwalk.inputs": ["Batch", "batches", "tokenize"],
    "embedwalk.models": ["load_model"],
    "embedwalk.run": ["Context", "Reader", "Writer", "run"],
    "embedwalk.lenses": [
        "TunedLens", "decompose", "decoding_walk", "load_tuned_lens", "logit_lens", "train_tuned_lens", "walk_lens",
    ],
    "embedwalk.association": ["UniformSwap", "association_bias"],
})
__version__ = "0.1.0"
__all__.append("__version__")
