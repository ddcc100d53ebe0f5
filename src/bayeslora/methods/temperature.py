"""Temperature scaling (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks").

One scalar ``T > 0`` fitted by minimizing the NLL of ``softmax(logits / T)`` on the validation split (L-BFGS on
``log T``); the predictive divides the source adapter's deterministic choice logits by ``T``. It changes
confidence, never the predicted class.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..predictive import Predictive
from .base import MethodConfig, MethodError
from .posthoc_base import PosthocMethod, collect_logits
from .registry import register_method

STATE_KEY = "log_temperature"
#: |log T| is clamped here: a perfectly separable fit set pushes T -> 0, logits that carry no information T -> inf
LOG_T_LIMIT = 6.0


@dataclass
class TemperatureConfig(MethodConfig):
    max_iter: int = field(default=200, metadata={"help": "L-BFGS iterations on log T"})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise MethodError(f"Expected `max_iter` to be a positive int, but got {self.max_iter!r}")


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits / T`` keeping ``-inf`` (absent choices) without NaN gradients; logits ``(..., C)``."""
    absent = ~torch.isfinite(logits)
    return (logits.masked_fill(absent, 0.0) / temperature).masked_fill(absent, float("-inf"))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The ``T`` minimizing ``NLL(softmax(logits / T), labels)``; logits ``(N, C)``, labels ``(N,)``."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise MethodError(f"Expected logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)} and "
                          f"{tuple(labels.shape)}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise MethodError("The source adapter's logits contain NaN/inf: cannot fit a temperature")
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scaled_logits(logits, log_t.exp()), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(-LOG_T_LIMIT, LOG_T_LIMIT).exp())


@register_method
class Temperature(PosthocMethod):
    name = "temperature"
    description = "temperature scaling: one T fitted by NLL on validation (post hoc, on a trained adapter)"
    weight_samples = False
    config_cls = TemperatureConfig
    fit_split = "validation"

    def __init__(self, config: TemperatureConfig | None = None):
        super().__init__(config)
        self.log_temperature = torch.zeros(())

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def fit(self, model, scorer, examples, batch_size=8, generator=None) -> dict:
        logits, labels = collect_logits(model, scorer, examples, batch_size)
        nll_before = float(torch.nn.functional.cross_entropy(logits, labels))
        t = fit_temperature(logits, labels, self.config.max_iter)
        self.log_temperature = torch.tensor(t).log()
        nll_after = float(torch.nn.functional.cross_entropy(scaled_logits(logits, torch.tensor(t)), labels))
        info = {"temperature": t, "nll_before": nll_before, "nll_after": nll_after}
        if abs(math.log(t)) >= LOG_T_LIMIT - 1e-9:
            why = ("the adapter separates the fit questions perfectly, so the NLL keeps falling as T -> 0" if t < 1
                   else "on the fit set the adapter's logits do no better than a uniform guess (they carry no "
                        "information about the answers, or point away from them), so the NLL keeps falling as T "
                        "grows and the scaled predictive is close to uniform")
            info["note"] = (f"T stopped at the limit e^{'-' if t < 1 else ''}{LOG_T_LIMIT:g} = {t:.4g}: {why}; "
                            f"check the fit set ({len(labels)} questions)")
            warnings.warn(info["note"], stacklevel=2)
        return info

    @torch.no_grad()
    def predict(self, model, scorer, batch, n_samples=None, generator=None) -> Predictive:
        self.resolve_samples(n_samples)
        logits = scorer.choice_logits(model, batch).float()
        return Predictive.from_logits(scaled_logits(logits, self.log_temperature.exp()))

    def state_dict(self, model) -> dict[str, torch.Tensor]:
        return {STATE_KEY: self.log_temperature.reshape(1).float()}

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        value = state.get(STATE_KEY)
        if value is None or value.numel() != 1 or not torch.isfinite(value).all():
            raise MethodError(f"The saved posterior lacks a finite `{STATE_KEY}`: the temperature run is corrupted")
        self.log_temperature = value.reshape(()).float().clone()
