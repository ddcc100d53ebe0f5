"""Evaluate a run on a dataset: metrics, per-example predictions with uncertainty, and a reliability diagram."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import metrics
from .config import MAX_SAMPLING_SEED, check_seed
from .io_utils import atomic_write_text, json_text
from .predictive import Predictive
from .tasks.base import MCExample
from .tasks.user import as_examples


def predict_examples(run, examples: list[MCExample | dict], n_samples: int | None = None, batch_size: int = 8,
                     seed: int = 0, progress: bool = False) -> Predictive:
    """Batched predictive of ``run`` over ``examples`` (:class:`MCExample` or dicts as in a JSONL data file, see
    :meth:`~bayeslora.runs.Run.predict`); ``C`` is the largest choice count among them.

    Each batch is scored with its own largest choice count and padded to ``C`` afterwards (probability 0): a
    Jacobian-based predictive (Laplace, TFB's linearized one) pays one backward per choice, and ARC's few 5-choice
    questions would otherwise make every batch pay five (1.3-1.4x the Jacobian time on the CPU; FINDINGS 28)."""
    examples = as_examples(examples, require_answer=False)
    if not examples:
        raise ValueError("Expected at least one example to predict")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}")
    generator = torch.Generator(device="cpu").manual_seed(check_seed(seed, MAX_SAMPLING_SEED))
    device = next(run.model.parameters()).device
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="predict", unit="batch", dynamic_ncols=True)
    parts = []
    for start in starts:
        enc = run.scorer.encode(examples[start:start + batch_size]).to(device)
        parts.append(run.method.predict(run.model, run.scorer, enc, n_samples=n_samples, generator=generator).detach())
    return Predictive.cat(parts)


def evaluate_examples(run, examples: list[MCExample | dict], n_samples: int | None = None, batch_size: int = 8,
                      seed: int = 0, progress: bool = False) -> tuple[dict, Predictive]:
    """Metrics and predictive of ``run`` on labelled ``examples`` (from :func:`~bayeslora.tasks.load_task`, or dicts
    as in a JSONL data file, each with its ``"answer"``).

    Returns ``(metrics, predictive)``: ``metrics`` holds ``acc``, ``ece`` (15 bins, in percent), ``nll``,
    ``brier``, ``auroc_misclassification`` and more (:func:`bayeslora.metrics.summary`), plus ``n_samples``,
    ``mean_epistemic``, ``mean_total`` and ``eval_time_s``. ``n_samples``: posterior samples (default: the run's
    own); ``seed``: their draws.
    """
    examples = as_examples(examples, require_answer=True)
    t0 = time.perf_counter()
    pred = predict_examples(run, examples, n_samples, batch_size, seed, progress)
    labels = torch.tensor([ex.label for ex in examples])
    result = metrics.summary(pred.probs, labels)
    result.update(eval_time_s=round(time.perf_counter() - t0, 3), n_samples=pred.n_samples,
                  mean_epistemic=pred.epistemic.mean().item(), mean_total=pred.total.mean().item())
    return result, pred


#: below this mean mutual information (nats) a sampled predictive is, for practical purposes, one model
COLLAPSED_EPISTEMIC = 1e-3


def collapse_note(result: dict, hint: str) -> str | None:
    """A warning when a sampled predictive has (almost) no epistemic uncertainty: its posterior is a point mass and
    the method behaves like MLE (docs/FINDINGS.md: short schedules leave the posterior scales at their init).
    ``hint``: what to change, the method's ``point_mass_hint``."""
    if not result.get("n_samples") or result.get("mean_epistemic", 1.0) >= COLLAPSED_EPISTEMIC:
        return None
    return (f"note: mean epistemic uncertainty is {result['mean_epistemic']:.1e} nats over {result['n_samples']} "
            "samples: the posterior is nearly a point mass, so these predictions are those of one model. What "
            f"helps: {hint}; see docs/FINDINGS.md")


def prediction_rows(examples: list[MCExample], pred: Predictive) -> list[dict]:
    rows = []
    for i, ex in enumerate(examples):
        rows.append({
            "id": ex.id, "label": ex.label, "prediction": int(pred.prediction[i]),
            "probs": [round(float(p), 6) for p in pred.probs[i, : ex.n_choices]],
            "confidence": float(pred.confidence[i]), "total": float(pred.total[i]),
            "aleatoric": float(pred.aleatoric[i]), "epistemic": float(pred.epistemic[i]),
        })
    return rows


def write_evaluation(out_dir: Path, examples: list[MCExample], pred: Predictive, result: dict, title: str) -> None:
    """metrics.json, predictions.jsonl and reliability.png in ``out_dir``: all three are made before any of them
    replaces an earlier evaluation's (each file atomically, metrics.json last), so a failure leaves the earlier set
    as it was."""
    import os

    from .plots import reliability_diagram

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json_text(r) + "\n" for r in prediction_rows(examples, pred))
    metrics_text = json_text(result, indent=2) + "\n"
    labels = torch.tensor([ex.label for ex in examples])
    staged = out_dir / ".reliability.staged.png"
    try:
        reliability_diagram(pred.probs, labels, staged, title=title)
        atomic_write_text(out_dir / "predictions.jsonl", lines)
        os.replace(staged, out_dir / "reliability.png")
        atomic_write_text(out_dir / "metrics.json", metrics_text)
    finally:
        staged.unlink(missing_ok=True)
