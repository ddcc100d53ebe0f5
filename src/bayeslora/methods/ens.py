"""Deep ensemble of LoRA adapters (Lakshminarayanan et al., 2017; LoRA ensembles: Wang et al., 2023).

K PEFT *named* adapters (``default``, ``member1``, ...) on one shared base model: no model copies, K times the
adapter's parameters. Members differ by their random initialization (PEFT's LoRA init, seeded by the training loop).

Training: every member sees the same batches. The batch is repeated K times and copy k is routed to member k in ONE
forward (PEFT's mixed-adapter batches, :func:`bayeslora.peft_ext.adapter_rows`); the loss is the members' mean
cross-entropy, so member k's gradient is its own loss gradient / K. AdamW keeps per-parameter state, so one AdamW over
the disjoint member parameters is the same as K separate optimizers (Adam is invariant to the 1/K scale, up to its
eps) -- except that the generic loop clips the *global* gradient norm over all members together.

Prediction: the average of the members' probabilities, all K members in one batched forward. ``n_samples`` = k > 0
uses the first ``min(k, K)`` members; ``n_samples = 0`` the first member alone (a single deterministic model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..peft_ext import adapter_rows, peft_quietly
from ..predictive import Predictive
from ..scoring import ChoiceScorer, EncodedBatch
from .base import AdapterConfig, BayesianMethod, MethodConfig, MethodError, SamplePlan, adapter_config_problem, \
    adapter_weights_problem
from .registry import register_method


#: each member is a whole LoRA adapter in memory, trained on every batch: far more than the papers' 3-5
MAX_MEMBERS = 64


def member_names(k: int) -> list[str]:
    return ["default"] + [f"member{i}" for i in range(1, k)]


@dataclass
class EnsembleConfig(MethodConfig):
    n_members: int = field(default=3, metadata={"help": "ensemble members K (named LoRA adapters)"})
    n_samples: int = field(default=3, metadata={"help": "members used at test time (0: the first member only)"})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_members, int) or isinstance(self.n_members, bool) \
                or not 1 <= self.n_members <= MAX_MEMBERS:
            raise MethodError(f"Expected ensemble `n_members` to be an int from 1 to {MAX_MEMBERS}, but got "
                              f"{self.n_members!r}")

    def sample_plan(self) -> SamplePlan:
        return SamplePlan(max_samples=self.n_members)


@register_method
class Ensemble(BayesianMethod):
    name = "ens"
    description = "Deep ensemble: K named LoRA adapters on one base model, trained and evaluated in one batch"
    config_cls = EnsembleConfig

    @property
    def members(self) -> list[str]:
        return member_names(self.config.n_members)

    def prepare(self, base_model, adapter: AdapterConfig):
        model = super().prepare(base_model, adapter)
        for name in self.members[1:]:
            with peft_quietly():
                model.add_adapter(name, adapter.lora_config())
        for pname, param in model.named_parameters():  # PEFT freezes inactive adapters; all members train
            if any(f".{name}." in pname for name in self.members):
                param.requires_grad_(True)
        return model

    def _logits(self, model, scorer: ChoiceScorer, batch: EncodedBatch, k: int) -> torch.Tensor:
        """Choice logits of the first ``k`` members, ``(k, B, C)``, in one forward."""
        B = batch.n_questions
        if k == 1:
            return scorer.choice_logits(model, batch).unsqueeze(0)
        rep = batch.repeat(k)  # question s * B + b is member s's copy of question b
        with adapter_rows(model, [self.members[q // B] for q in range(k * B)]):
            return scorer.choice_logits(model, rep).view(k, B, -1)

    def nll(self, model, scorer: ChoiceScorer, batch: EncodedBatch, generator: torch.Generator | None,
            shard: tuple[int, int] = (0, 1)):  # no random draws: every member sees every question
        logits = self._logits(model, scorer, batch, self.config.n_members)  # (K, B, C)
        K, B, C = logits.shape
        return torch.nn.functional.cross_entropy(logits.reshape(K * B, C), batch.labels.repeat(K))

    @torch.no_grad()
    def predict(self, model, scorer: ChoiceScorer, batch: EncodedBatch, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Predictive:
        n = self.resolve_samples(n_samples)
        if n == 0:
            return Predictive.from_logits(scorer.choice_logits(model, batch))
        return Predictive.from_sample_logits(self._logits(model, scorer, batch, min(n, self.config.n_members)))

    def sample_logits(self, model, scorer: ChoiceScorer, batch: EncodedBatch, n_samples: int,
                      generator: torch.Generator | None = None, batched: bool = True) -> torch.Tensor:
        """Members' logits ``(S, B, C)``; sample ``s`` is member ``s mod K``."""
        if batched and n_samples <= self.config.n_members:
            return self._logits(model, scorer, batch, n_samples)
        out = []
        for s in range(n_samples):
            name = self.members[s % self.config.n_members]
            with adapter_rows(model, [name] * batch.n_questions):
                out.append(scorer.choice_logits(model, batch))
        return torch.stack(out)

    def sampling(self, model, groups: torch.Tensor | None, n_groups: int | None = None,
                 generator: torch.Generator | None = None, antithetic: bool = False, center: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        """Question ``q`` uses member ``groups[q] mod K`` (``groups=None``: member ``q mod K``)."""
        if antithetic or center:
            raise MethodError("Ensemble members have no antithetic mirror images and no posterior mean")
        if groups is None:
            groups = torch.arange(n_groups)
        if groups.numel() == 0:
            return contextlib.nullcontext()
        names = self.members
        return adapter_rows(model, [names[int(g) % len(names)] for g in groups.tolist()])

    def load_extra_adapters(self, model, adapter_dir: Path) -> None:
        for name in self.members[1:]:
            path = Path(adapter_dir) / name
            if not (path / "adapter_config.json").is_file():
                raise MethodError(f"Ensemble member {name!r} is missing: {path}/adapter_config.json not found "
                                  f"(expected {self.config.n_members} members)")
            problem = adapter_config_problem(path)
            if problem:
                raise MethodError(f"Ensemble member {name!r} in {path} is not usable: {problem}")
            try:
                with peft_quietly():
                    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except Exception as exc:  # noqa: BLE001 - PEFT raises many types for a mismatched adapter
                raise MethodError(f"Could not load ensemble member {name!r} from {path}: {exc}") from exc
            problem = adapter_weights_problem(model, path, name)
            if problem:
                raise MethodError(f"Ensemble member {name!r} in {path} is not usable: {problem}")
