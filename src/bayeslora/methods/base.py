"""The method interface: every way of fine-tuning or Bayesianizing a LoRA adapter is one :class:`BayesianMethod`.

A method's life cycle, driven by the generic training loop (:mod:`bayeslora.train`) and evaluation:

1. ``prepare(base_model, adapter)`` injects PEFT LoRA adapters (and any posterior parameters) and returns the
   PEFT model;
2. training minimizes ``nll(model, scorer, batch, generator) + kl_scale(n_train) * kl()``;
3. ``fit(...)`` (post-hoc methods only) fits on held-out data after training;
4. ``predict(model, scorer, batch, n_samples, generator)`` returns a :class:`~bayeslora.predictive.Predictive`;
5. ``save(model, dir)`` / ``load(base_model, dir)``: the PEFT adapter (safetensors) plus the method's own
   tensors in ``posterior.safetensors`` and its config in ``run.json``. No pickle anywhere.

Methods never touch the global RNG: randomness comes from the ``torch.Generator`` they are given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from ..fieldtypes import check_field_types
from ..peft_ext import peft_quietly, posterior_state, sample_groups, stochastic_layers
from ..predictive import Predictive
from ..scoring import ChoiceScorer, EncodedBatch

POSTERIOR_FILE = "posterior.safetensors"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"  # training checkpoints (bayeslora.train)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class MethodError(ValueError):
    """A method used wrongly or a saved method that cannot be restored."""


@dataclass
class AdapterConfig:
    """The LoRA adapter every method builds on (defaults: the BLoB paper's setting)."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (PEFT lora_dropout)"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "lm_head"],
                                      metadata={"help": "module names that get LoRA"})

    def __post_init__(self):
        check_field_types(self, MethodError, "LoRA ")
        if not isinstance(self.r, int) or self.r < 1:
            raise MethodError(f"Expected LoRA rank `r` to be a positive int, but got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodError(f"Expected LoRA `dropout` in [0, 1), but got {self.dropout!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise MethodError(f"Expected LoRA `alpha` to be a finite number > 0, but got {self.alpha!r}")
        if not self.target_modules:
            raise MethodError("Expected at least one LoRA target module")

    def lora_config(self, **overrides):
        from peft import LoraConfig

        kwargs = dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                      target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")
        kwargs.update(overrides)
        return LoraConfig(**kwargs)


@dataclass(frozen=True)
class SamplePlan:
    """How a method draws its S posterior samples at prediction time, read from its prediction options: the same
    plan shapes the choice predictive (:meth:`BayesianMethod.predict`) and generation in ``bayeslora serve``
    (:func:`bayeslora.serve.generation.decode`)."""

    antithetic: bool = False  # samples in mirrored pairs (eps, -eps): S must be even
    mean_prompt: bool = False  # the prompt runs once at the posterior mean; only the later positions are sampled
    chunk: int = 0  # samples per batched forward (0: all S in one)
    head: bool = False  # the trunk runs once at the posterior mean; only the LM head's LoRA is sampled
    max_samples: int = 0  # distinct samples the posterior has (an ensemble's members; 0: no limit)
    # generation decodes the linearized predictive: the posterior mean plus the central differences of S/2 mirrored
    # pairs (S even), read from one batched forward of S + 1 rows (see bayeslora.serve.generation.decode)
    linearized: bool = False
    # False: the S samples are logit samples of the choice predictive (Laplace's linearized predictive) and there is
    # no weight sample to decode: generation is the adapter's own decode, with no epistemic part
    decodes: bool = True

    def samples(self, n_samples: int) -> int:
        """The samples actually drawn for ``n_samples`` requested: at most ``max_samples``, so that no member of a
        finite posterior counts twice in the average."""
        return min(n_samples, self.max_samples) if self.max_samples else n_samples

    def check(self, n_samples: int, generation: bool = False) -> None:
        """A clear error when ``n_samples`` (> 0) cannot be drawn under this plan (``generation``: by the decoder)."""
        if self.antithetic:
            check_pairs(n_samples)
        elif generation and self.linearized:
            check_pairs(n_samples, "Generation under a linearized predictive (TFB's predictive=glm)")


@dataclass
class MethodConfig:
    """Options shared by all methods; each method subclasses it in its own file."""

    n_samples: int = field(default=0, metadata={"help": "posterior samples at test time (0: deterministic)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the adapter"})
    #: options that only change how a trained or fitted posterior predicts (``bayeslora eval --option``); the
    #: others shape training or the fit, and changing them on a saved run would have no effect
    PREDICTION_OPTIONS: ClassVar[tuple[str, ...]] = ("n_samples",)

    def __post_init__(self):
        check_field_types(self, MethodError)
        if not isinstance(self.n_samples, int) or self.n_samples < 0:
            raise MethodError(f"Expected `n_samples` to be a non-negative int, but got {self.n_samples!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise MethodError(f"Unknown option(s) {sorted(unknown)} for this method; its options: {sorted(known)}")
        return cls(**values)

    @classmethod
    def with_prediction_options(cls, saved: dict, overrides: dict) -> MethodConfig:
        """The saved run's config with prediction-time ``overrides``; a training- or fit-time key is refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MethodError(f"Unknown option(s) {unknown} for this method; the options that change prediction are "
                              f"{list(cls.PREDICTION_OPTIONS)}")
        fixed = sorted(set(overrides) & known - set(cls.PREDICTION_OPTIONS))
        if fixed:
            raise MethodError(f"{fixed} shape(s) training or the post-hoc fit and cannot change on a saved run; "
                              f"the options that change prediction are {list(cls.PREDICTION_OPTIONS)} (retrain, or "
                              "re-run bayesianize, to change the others)")
        return cls.from_dict({**saved, **overrides})

    def sample_plan(self) -> SamplePlan:
        """How prediction draws samples (default: independent samples, all in one forward)."""
        return SamplePlan()


def check_pairs(n_samples: int, what: str = "The antithetic predictive") -> None:
    """An antithetic predictive draws its samples in mirrored pairs (eps, -eps): S must be even."""
    if n_samples % 2:
        raise MethodError(f"{what} draws samples in mirrored pairs: n_samples must be even, but got {n_samples}")


#: ``prompt`` option: where the weight samples act (see :meth:`~bayeslora.scoring.ChoiceScorer.mean_prompt_logits`)
PROMPTS = ("sample", "mean")


@dataclass
class SampledConfig(MethodConfig):
    """Options of the methods whose predictive runs posterior samples through the model (BLoB, MC-dropout, TFB,
    sgp): ``sample_chunk`` bounds how many of the S samples share one batched forward; ``prompt="mean"`` runs the
    prompt once at the posterior mean (see :meth:`~bayeslora.scoring.ChoiceScorer.mean_prompt_logits`)."""

    sample_chunk: int = field(default=0, metadata={"help": "test-time samples per batched forward (0: all S in "
                                                            "one; a smaller chunk bounds the S x batch rows held "
                                                            "in memory)"})
    prompt: str = field(default="sample", metadata={"help": "sample (every position sees the weight sample) or "
                                                            "mean (the prompt runs once at the posterior mean; "
                                                            "only the scored positions, or in generation the last "
                                                            "prompt token and the new ones, are sampled)"})
    PREDICTION_OPTIONS: ClassVar[tuple[str, ...]] = ("n_samples", "sample_chunk", "prompt")

    def __post_init__(self):
        super().__post_init__()
        value = self.sample_chunk
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MethodError(f"Expected `sample_chunk` to be a non-negative int (0: all samples in one forward), "
                              f"but got {value!r}")
        if self.prompt not in PROMPTS:
            raise MethodError(f"Expected `prompt` in {list(PROMPTS)}, but got {self.prompt!r}")

    def sample_plan(self) -> SamplePlan:
        return SamplePlan(chunk=self.sample_chunk, mean_prompt=self.prompt == "mean")


def adapter_config_problem(adapter_dir: Path) -> str | None:
    """Why ``adapter_dir``'s config is not a LoRA adapter's (``None`` when it is); checked before PEFT loads it."""
    import json

    try:
        peft_type = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return f"{ADAPTER_CONFIG} is not a readable JSON object"
    if str(peft_type).upper() != "LORA":
        return f"it holds a {peft_type!r} adapter, not LoRA"
    return None


def adapter_weights_problem(model: torch.nn.Module, adapter_dir: Path, adapter_name: str = "default") -> str | None:
    """Why the adapter saved in ``adapter_dir`` does not fill the LoRA weights of adapter ``adapter_name`` of the
    PEFT ``model`` it was loaded into (``None`` when it does). PEFT only warns about missing weights and keeps their
    random initial values, and it loads other adapter types (IA3, ...) too."""
    from safetensors import safe_open

    problem = adapter_config_problem(adapter_dir)
    if problem:
        return problem
    try:
        with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as fh:
            saved = {k for k in fh.keys() if ".lora_" in k}
    except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file
        return f"{ADAPTER_WEIGHTS} is not a readable safetensors file ({brief_error(exc, 1)})"
    tag = f".{adapter_name}."
    expected = {n.replace(tag, ".") for n, _ in model.named_parameters() if ".lora_" in n and tag in n}
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if not expected or missing or unexpected:
        return (f"its LoRA weights do not match the model's LoRA modules ({len(missing)} missing, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): a damaged file, or an adapter "
                "for another base model or other target modules")
    bad = [n.replace(tag, ".") for n, p in model.named_parameters()
           if ".lora_" in n and tag in n and not torch.isfinite(p).all()]
    if bad:
        return (f"{len(bad)} of its LoRA weights hold NaN/inf, e.g. {bad[:2]}: a damaged file, or training "
                "that diverged")
    return None


def brief_error(exc: BaseException, max_lines: int = 2) -> str:
    """An exception's message on one line: its first ``max_lines`` lines and how many more there were (PEFT's
    size-mismatch error lists every tensor, 121 lines for a rank mismatch on SmolLM2)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    more = len(lines) - max_lines
    return " ".join(lines[:max_lines]) + (f" (and {more} more lines)" if more > 0 else "")


class BayesianMethod:
    """Base class. Subclasses set ``name``, ``description`` and ``config_cls`` and register themselves."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: post-hoc methods start from a trained adapter (``bayeslora calibrate`` / ``bayesianize``)
    posthoc: ClassVar[bool] = False
    #: False for a point estimate (mle, map, temperature): S "samples" would all be the same model
    weight_samples: ClassVar[bool] = True
    #: what to change when the posterior comes out a point mass (``bayeslora eval`` prints it)
    point_mass_hint: ClassVar[str] = "a longer schedule, or the method's options that widen its posterior"

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()
        if not isinstance(self.config, self.config_cls):
            raise MethodError(f"{self.name} expects a {self.config_cls.__name__}, got {type(self.config).__name__}")

    # -- building -------------------------------------------------------------------------------------------
    def prepare(self, base_model: torch.nn.Module, adapter: AdapterConfig):
        """Inject the adapter(s); return the PEFT model with only adapter/posterior parameters trainable."""
        from peft import get_peft_model

        with peft_quietly():
            return get_peft_model(base_model, adapter.lora_config())

    def param_groups(self, model) -> list[dict]:
        """Optimizer parameter groups (default: all trainable parameters with the config's weight decay)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.config.weight_decay}]

    # -- training -------------------------------------------------------------------------------------------
    def nll(self, model, scorer: ChoiceScorer, batch: EncodedBatch, generator: torch.Generator | None,
            shard: tuple[int, int] = (0, 1)):
        """Mean cross-entropy of the training batch (one posterior sample per question where there is one).
        ``shard``: ``(rank, processes)`` when the global batch is split over data-parallel processes by striding;
        each question then gets the sample it would get in one process (see
        :class:`~bayeslora.peft_ext.SamplingState`)."""
        with self.sampling(model, None, n_groups=batch.n_questions, generator=generator, shard=shard):
            logits = scorer.choice_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, batch.labels)

    def kl(self) -> torch.Tensor:
        """KL(q || p) of the posterior parameters; zero for non-variational methods."""
        return torch.zeros(())

    def kl_scale(self, n_train: int) -> float:
        """Weight of :meth:`kl` in the per-example loss (default 1 / N: the ELBO divided by the data size)."""
        return 1.0 / max(n_train, 1)

    # -- post-hoc -------------------------------------------------------------------------------------------
    def fit(self, model, scorer: ChoiceScorer, examples: list, batch_size: int = 8,
            generator: torch.Generator | None = None) -> dict:
        """Post-hoc fit on ``examples``; returns a dict of fitted values to log. Default: nothing to fit."""
        return {}

    # -- prediction -----------------------------------------------------------------------------------------
    def sampling(self, model, groups: torch.Tensor | None, n_groups: int | None = None,
                 generator: torch.Generator | None = None, antithetic: bool = False, center: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        """Context manager: inside it, question ``b`` of every forward uses posterior sample ``groups[b]``
        (``groups=None``: sample ``b``, one per question, ``n_groups`` of them).

        Used for training (one sample per question), batched prediction (a batch repeated S times, one group per
        copy) and generation (S copies of a prompt decoded together). Default: the stochastic LoRA layers of
        :mod:`bayeslora.peft_ext` (a no-op for a deterministic model); methods with other kinds of samples
        (ensemble members, ...) override it. ``antithetic``: mirrored noise pairs; ``center``: the last group is
        the posterior mean (see :func:`sample_groups`).
        """
        return sample_groups(model, groups, n_groups, generator, antithetic=antithetic, center=center, shard=shard)

    def head_sampler(self, model, n_samples: int, generator: torch.Generator | None = None):
        """For a plan with ``head``: ``(LM-head layer, deltas)``, ``deltas(h)`` giving the logit offsets (S, N, V)
        of S posterior samples of the head at its inputs ``h`` (N, H) (see :func:`bayeslora.methods.head.head_sampler`)."""
        from .head import head_sampler

        plan = self.config.sample_plan()
        if not plan.head:
            raise MethodError(f"Method {self.name!r} has no head predictive with these options")
        return head_sampler(model, n_samples, generator, antithetic=plan.antithetic)

    def resolve_samples(self, n_samples: int | None) -> int:
        n = self.config.n_samples if n_samples is None else n_samples
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise MethodError(f"Expected `n_samples` to be a non-negative int, but got {n!r}")
        return n

    @torch.no_grad()
    def predict(self, model, scorer: ChoiceScorer, batch: EncodedBatch, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Predictive:
        """Predictive over the batch's choices: probs ``(B, C)`` (+ samples ``(S, B, C)`` where sampled).

        ``n_samples`` = 0 (or a model without stochastic layers): the deterministic forward (posterior mean);
        otherwise S samples drawn as the config's :meth:`~MethodConfig.sample_plan` says.
        """
        n = self.resolve_samples(n_samples)
        if n == 0 or not stochastic_layers(model):
            return Predictive.from_logits(scorer.choice_logits(model, batch))
        plan = self.config.sample_plan()
        plan.check(n)
        if plan.head:
            from .head import head_sample_logits

            return Predictive.from_sample_logits(head_sample_logits(model, scorer, batch, n, generator,
                                                                    antithetic=plan.antithetic))
        return Predictive.from_sample_logits(self.sample_logits(model, scorer, batch, n, generator,
                                                                antithetic=plan.antithetic,
                                                                mean_prompt=plan.mean_prompt))

    def sample_logits(self, model, scorer: ChoiceScorer, batch: EncodedBatch, n_samples: int,
                      generator: torch.Generator | None = None, batched: bool = True,
                      antithetic: bool = False, mean_prompt: bool = False) -> torch.Tensor:
        """Choice logits of ``n_samples`` posterior samples, shape ``(S, B, C)``.

        ``batched``: the samples run as batched forwards over the batch repeated, ``sample_chunk`` samples per
        forward (the config's; 0 or absent: all S in ONE forward; question ``s * B + b`` of a forward uses sample
        ``s * B + b``); otherwise S forwards one after the other (same distribution, for benchmarks).
        ``antithetic`` (batched only): within each forward of ``s`` samples, sample ``i + s / 2`` mirrors sample
        ``i`` (S even; an odd chunk is rounded up to keep the pairs together).
        ``mean_prompt`` (batched only): the prompt runs once per forward at the posterior mean and only the scored
        positions are sampled (:meth:`~bayeslora.scoring.ChoiceScorer.mean_prompt_logits`).
        """
        B = batch.n_questions
        if not batched:
            out = []
            for _ in range(n_samples):
                with self.sampling(model, None, n_groups=B, generator=generator):
                    out.append(scorer.choice_logits(model, batch))
            return torch.stack(out)
        chunk = self.config.sample_plan().chunk or n_samples
        if antithetic:
            chunk += chunk % 2
        out = []
        for start in range(0, n_samples, chunk):
            s = min(chunk, n_samples - start)

            def sampling(s=s):
                return self.sampling(model, None, n_groups=s * B, generator=generator, antithetic=antithetic)

            if mean_prompt:
                out.append(scorer.mean_prompt_logits(model, batch, s, sampling))
            else:
                with sampling():
                    out.append(scorer.choice_logits(model, batch.repeat(s)).view(s, B, -1))
        return out[0] if len(out) == 1 else torch.cat(out)

    # -- persistence ----------------------------------------------------------------------------------------
    def state_dict(self, model) -> dict[str, torch.Tensor]:
        """Method tensors that are not in the PEFT adapter: by default the posterior parameters of the model's
        stochastic LoRA layers (see :mod:`bayeslora.peft_ext`). Methods with other state extend it."""
        return dict(posterior_state(model))

    def load_state_dict(self, model, state: dict[str, torch.Tensor]) -> None:
        expected = posterior_state(model)
        if expected and not state:
            raise MethodError(f"Method {self.name!r} needs its posterior ({POSTERIOR_FILE}), but the run has none")
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise MethodError(f"The saved posterior does not match method {self.name!r}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for key, tensor in expected.items():
                if tensor.shape != state[key].shape:
                    raise MethodError(f"Posterior tensor {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(tensor.shape)}")
                if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
                    raise MethodError(f"Posterior tensor {key} holds NaN/inf: the run is corrupted")
                tensor.copy_(state[key])

    def attach(self, model) -> None:
        """Re-create posterior modules on a PEFT model loaded from disk (before :meth:`load_state_dict`)."""

    def save(self, model, out_dir: Path) -> None:
        """PEFT adapter (without posterior tensors) + ``posterior.safetensors`` (when there is any)."""
        out_dir = Path(out_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict(model).items()}
        adapter_state = {k: v for k, v in model.state_dict().items() if k not in state}
        # save_embedding_layers=False: a LoRA on a tied LM head must not copy the whole embedding matrix
        model.save_pretrained(str(out_dir / ADAPTER_DIR), state_dict=adapter_state, save_embedding_layers=False)
        # written even when empty: its metadata names the method, so another method refuses to load the run
        save_file(state, str(out_dir / POSTERIOR_FILE), metadata={"method": self.name})

    def load(self, base_model: torch.nn.Module, run_dir: Path):
        """Load the adapter(s) of ``run_dir`` onto ``base_model`` and restore this method's state."""
        from peft import PeftModel

        run_dir = Path(run_dir)
        adapter_dir = run_dir / ADAPTER_DIR
        if not (adapter_dir / "adapter_config.json").is_file():
            unfinished = ""
            if (run_dir / CHECKPOINT_DIR).is_dir():
                unfinished = (": it is a training run that did not finish; continue it with `bayeslora train` and "
                              f"its settings (run.json, 'train') plus --out {run_dir} --resume")
            raise MethodError(f"{run_dir} has no PEFT adapter ({adapter_dir}/adapter_config.json is missing)"
                              + unfinished)
        problem = adapter_config_problem(adapter_dir)
        if problem:
            raise MethodError(f"The adapter in {adapter_dir} is not usable: {problem}")
        try:
            with peft_quietly():
                model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
        except Exception as exc:  # noqa: BLE001 - PEFT raises many types for a mismatched adapter
            raise MethodError(f"Could not load the adapter in {adapter_dir} onto the base model: "
                              f"{brief_error(exc)}") from exc
        problem = adapter_weights_problem(model, adapter_dir)
        if problem:
            raise MethodError(f"The adapter in {adapter_dir} is not usable: {problem}")
        self.load_extra_adapters(model, adapter_dir)
        self.attach(model)
        self.load_state_dict(model, read_posterior(run_dir, self.name))
        return model

    def load_extra_adapters(self, model, adapter_dir: Path) -> None:
        """Load named adapters beyond ``default`` (ensembles)."""


def read_posterior(run_dir: Path, method_name: str) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / POSTERIOR_FILE
    if not path.exists():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            saved_by = (fh.metadata() or {}).get("method")
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise MethodError(f"{path} is not a readable safetensors file ({exc}); the run is corrupted") from exc
    if saved_by is not None and saved_by != method_name:
        raise MethodError(f"{path} was saved by method {saved_by!r}, not {method_name!r}")
    return state


def write_json(path: Path, obj) -> None:
    from ..io_utils import atomic_write_text, json_text

    atomic_write_text(Path(path), json_text(obj, indent=2, default=str) + "\n")
