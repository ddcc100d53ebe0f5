"""Fixtures for the serve tests: tiny models (deterministic and a test-only stochastic one) and live servers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest
import torch

from bayeslora.methods import BayesianMethod, MethodConfig, SamplePlan
from bayeslora.methods.base import AdapterConfig
from bayeslora.models import build_tiny_llama
from bayeslora.peft_ext import GaussianLoraA, replace_lora_A
from bayeslora.predictive import Predictive
from bayeslora.runs import Run
from bayeslora.scoring import make_scorer
from bayeslora.serve import InferenceService, ServeSettings, base_run
from bayeslora.serve.server import background_server


class GaussianTestMethod(BayesianMethod):
    """Test-only (never registered): Gaussian LoRA A factors sampled through the base class's ``sampling``."""

    name = "test-gaussian"
    description = "test-only stochastic LoRA"

    @torch.no_grad()
    def predict(self, model, scorer, batch, n_samples=None, generator=None) -> Predictive:
        S = self.resolve_samples(n_samples)
        if S <= 1:
            return Predictive.from_logits(scorer.choice_logits(model, batch))
        B = batch.n_questions
        with self.sampling(model, torch.arange(S * B), n_groups=S * B, generator=generator):
            logits = scorer.choice_logits(model, batch.repeat(S))
        return Predictive.from_sample_logits(logits.view(S, B, -1))


def stochastic_run(n_samples: int = 4, std: float = 0.5) -> Run:
    """Tiny Llama + LoRA with random non-zero B and Gaussian A (std ``std``): samples disagree visibly."""
    model, tokenizer = build_tiny_llama(seed=0)
    method = GaussianTestMethod(MethodConfig(n_samples=n_samples))
    peft_model = method.prepare(model, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    replace_lora_A(peft_model, lambda name, lin: GaussianLoraA(lin, torch.full_like(lin.weight, std),
                                                               std_fn=lambda r: r, trainable=False))
    peft_model.eval()
    scorer = make_scorer("cloze", tokenizer, max_length=128)
    info = {"model": "tiny-random-llama", "method": method.name, "format": "cloze"}
    return Run(model=peft_model, tokenizer=tokenizer, method=method, scorer=scorer, info=info)


@dataclasses.dataclass
class PlanConfig(MethodConfig):
    """Test config whose prediction options are a given :class:`SamplePlan`."""

    plan: SamplePlan = dataclasses.field(default_factory=SamplePlan)

    def sample_plan(self) -> SamplePlan:
        return self.plan


def with_plan(run: Run, **plan) -> Run:
    """``run`` (the same model) under a method whose sample plan is ``SamplePlan(**plan)``."""
    return dataclasses.replace(run, method=GaussianTestMethod(PlanConfig(n_samples=4, plan=SamplePlan(**plan))))


@pytest.fixture(scope="session")
def planned():
    """``planned(run, **plan)``: :func:`with_plan`."""
    return with_plan


@pytest.fixture(scope="session")
def tiny_base_run() -> Run:
    return base_run("tiny-random-llama", max_length=128)


@pytest.fixture(scope="session")
def tiny_stochastic_run() -> Run:
    return stochastic_run()


@pytest.fixture(scope="session")
def tiny_point_run() -> Run:
    """The stochastic run's model with a zero posterior std: every sample is the mean."""
    return stochastic_run(std=0.0)


@pytest.fixture(scope="module")
def server(tiny_base_run) -> Iterator[str]:
    settings = ServeSettings(max_tokens=64, default_max_tokens=8, queue_size=64)
    with background_server(settings, InferenceService(tiny_base_run, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def stochastic_server(tiny_stochastic_run) -> Iterator[str]:
    settings = ServeSettings(max_tokens=64, default_max_tokens=8, max_samples=8, api_key="sekret")
    with background_server(settings, InferenceService(tiny_stochastic_run, settings, model_id="tiny-bayes")) as url:
        yield url


@pytest.fixture
def start_server():
    """:func:`~bayeslora.serve.server.background_server`, for tests that need their own settings."""
    return background_server


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, trust_env=False, timeout=30) as client:
        yield client
