"""embedwalk: read the embedding-space walk of TransformerLens models."""

from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Batch, batches, tokenize
from embedwalk.models import load_model
from embedwalk.run import Context, Reader, Writer, run

__version__ = "0.1.0"

__all__ = [
    "Batch", "Context", "EmbedwalkError", "ModelAdapter", "Reader", "Writer",
    "adapt", "batches", "load_model", "run", "tokenize", "__version__",
]
