"""Out-of-distribution detection from a predictive's uncertainty (the OOD protocol of the BLoB paper).

Wang et al. (2024, "BLoB: Bayesian Low-Rank Adaptation by Backpropagation for Large Language Models") train on
OpenBookQA and evaluate on ARC-Challenge and ARC-Easy (near OOD). Besides accuracy / ECE / NLL on the OOD set, an
uncertainty score should rank OOD questions above in-distribution ones: we report the AUROC of separating them by
the epistemic uncertainty (mutual information) and by the predictive entropy (total uncertainty).
"""

from __future__ import annotations

import torch

from ..metrics import auroc
from ..predictive import Predictive

#: The BLoB protocol: the in-distribution training task and its OOD evaluation tasks.
OOD_TRAIN_TASK = "obqa"
OOD_TASKS = ("arc-c", "arc-e")


def ood_auroc(in_dist: Predictive, out_dist: Predictive) -> dict[str, float]:
    """AUROC of OOD (positive) vs in-distribution questions, scored by epistemic and by total uncertainty.

    A deterministic predictive has zero epistemic uncertainty everywhere, so its epistemic AUROC is 0.5 (ties).
    """
    scores = {"epistemic": (in_dist.epistemic, out_dist.epistemic), "entropy": (in_dist.total, out_dist.total)}
    positives = torch.cat([torch.zeros(len(in_dist.probs), dtype=torch.bool),
                           torch.ones(len(out_dist.probs), dtype=torch.bool)])
    return {f"auroc_ood_{name}": auroc(torch.cat([s_in, s_out]), positives)
            for name, (s_in, s_out) in scores.items()}
