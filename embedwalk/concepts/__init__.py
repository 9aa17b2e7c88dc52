"""Concept-space regression: model-independent core.

Streaming statistics (:mod:`.stats`), ridge regressions (:mod:`.ridge`), linear
probes (:mod:`.probes`), controls (:mod:`.controls`) and small curated concept
datasets (:mod:`.datasets`).  Torch tensors in, result objects out; no model code.
"""

from .controls import (
    ControlTaskResult,
    PermutationResult,
    control_task,
    control_task_labels,
    evaluate_controls,
    permutation_p_value,
    permutation_test,
    probe_cv_scorer,
    ridge_cv_scorer,
    shuffle_labels_by_group,
)
from .datasets import list_datasets, load_dataset
from .probes import (
    LinearProbe,
    ProbeCV,
    cross_validate_probe,
    fit_lda_probe,
    fit_logistic_probe,
    fit_mass_mean_probe,
)
from .ridge import RidgeFit, default_alphas, fit_ridge, heldout_sse, ridge_path
from .stats import ClassStats, FoldedStats, MomentStats, group_folds, tensor_batches

__all__ = [
    "MomentStats", "ClassStats", "FoldedStats", "group_folds", "tensor_batches",
    "RidgeFit", "fit_ridge", "ridge_path", "heldout_sse", "default_alphas",
    "LinearProbe", "ProbeCV", "fit_mass_mean_probe", "fit_lda_probe",
    "fit_logistic_probe", "cross_validate_probe",
    "shuffle_labels_by_group", "control_task_labels", "permutation_p_value",
    "permutation_test", "control_task", "evaluate_controls", "PermutationResult",
    "ControlTaskResult", "ridge_cv_scorer", "probe_cv_scorer",
    "list_datasets", "load_dataset",
]
