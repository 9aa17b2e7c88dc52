"""Token-priority graphs: what one self-attention layer learns from next-token prediction.

Reproduces Li, Huang, Ildiz, Rawat & Oymak, "Mechanics of Next Token Prediction with
Self-Attention" (AISTATS 2024) and bridges it to real TransformerLens heads.
"""

from .graphs import PriorityGraphs, build_priority_graphs
from .heads import HeadPriorityResult, graphs_from_tokens, retrieval_mask, retrieval_scores, score_heads
from .model import HeadPriorityReader, head_priority
from .reproduce import PAPER_VALUES, ReproductionResult, format_table, reproduce
from .single_layer import TokenDataset, TrainingRun, generate_dataset, loss_and_grad, make_embeddings, run_experiment
from .svm import SVMConstraints, finite_subspace, graph_svm, reduced_key_mask, svm_constraints

__all__ = [
    "PriorityGraphs",
    "build_priority_graphs",
    "HeadPriorityResult",
    "graphs_from_tokens",
    "retrieval_mask",
    "retrieval_scores",
    "score_heads",
    "HeadPriorityReader",
    "head_priority",
    "PAPER_VALUES",
    "ReproductionResult",
    "format_table",
    "reproduce",
    "TokenDataset",
    "TrainingRun",
    "generate_dataset",
    "loss_and_grad",
    "make_embeddings",
    "run_experiment",
    "SVMConstraints",
    "finite_subspace",
    "graph_svm",
    "reduced_key_mask",
    "svm_constraints",
]
