"""bayeslora: Bayesian low-rank adaptation of LLMs, calibrated evaluation and serving."""

from __future__ import annotations

from .config import TrainConfig
from .evaluate import evaluate_examples, predict_examples
from .methods import METHODS, AdapterConfig, BayesianMethod, build_method, register_method
from .metrics import summary as calibration_summary
from .models import load_model
from .posthoc import bayesianize
from .predictive import Predictive
from .runs import Run, load_run
from .tasks import MCExample, load_task
from .train import train

__version__ = "0.1.0"

__all__ = ["METHODS", "AdapterConfig", "BayesianMethod", "MCExample", "Predictive", "Run", "TrainConfig",
           "bayesianize", "build_method", "calibration_summary", "evaluate_examples", "load_model", "load_run", "load_task",
           "predict_examples", "register_method", "train"]
