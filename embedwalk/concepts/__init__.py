"""Concept-space regression: model-independent core.

Streaming statistics (:mod:`.stats`), ridge regressions (:mod:`.ridge`), linear
probes (:mod:`.probes`), controls (:mod:`.controls`) and small curated concept
datasets (:mod:`.datasets`).  Torch tensors in, result objects out; no model code.
"""

from embedwalk._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "embedwalk.concepts.controls": [
        "ControlTaskResult", "PermutationResult", "control_task", "control_task_labels", "evaluate_controls",
        "permutation_p_value", "permutation_test", "probe_cv_scorer", "ridge_cv_scorer", "shuffle_labels_by_group",
    ],
    "embedwalk.concepts.datasets": ["list_datasets", "load_dataset"],
    "embedwalk.concepts.probes": [
        "LinearProbe", "ProbeCV", "cross_validate_probe", "fit_lda_probe", "fit_logistic_probe", "fit_mass_mean_probe",
    ],
    "embedwalk.concepts.ridge": ["RidgeFit", "default_alphas", "fit_ridge", "heldout_sse", "ridge_path"],
    "embedwalk.concepts.stats": ["ClassStats", "FoldedStats", "MomentStats", "group_folds", "tensor_batches"],
})
