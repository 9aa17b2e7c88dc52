"""Token-priority graphs: what one self-attention layer learns from next-token prediction.

Reproduces Li, Huang, Ildiz, Rawat & Oymak, "Mechanics of Next Token Prediction with
Self-Attention" (AISTATS 2024) and bridges it to real TransformerLens heads.
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.priority.graphs": ["PriorityGraphs", "build_priority_graphs"],
    "embedwalk.priority.heads": [
        "HeadPriorityResult", "graphs_from_tokens", "retrieval_mask", "retrieval_scores", "score_heads",
    ],
    "embedwalk.priority.model": ["HeadPriorityReader", "head_priority"],
    "embedwalk.priority.reproduce": ["PAPER_VALUES", "ReproductionResult", "format_table", "reproduce"],
    "embedwalk.priority.single_layer": [
        "TokenDataset", "TrainingRun", "generate_dataset", "loss_and_grad", "make_embeddings", "run_experiment",
    ],
    "embedwalk.priority.svm": ["SVMConstraints", "finite_subspace", "graph_svm", "reduced_key_mask", "svm_constraints"],
})
