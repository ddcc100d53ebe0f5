"""The training configuration: one dataclass, written resolved next to every run (``run.json``)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from .fieldtypes import check_field_types
from .methods.base import AdapterConfig
from .models import DEFAULT_MODEL, DTYPES, TINY_MODEL, resolve_spec
from .scoring import ChoiceFormat

# Small models answer much better in the cloze format than by letter (SmolLM2-135M zero-shot on ARC-E: ~46% vs
# ~31%; on the built-in task: 40% vs chance; fine-tuned by letter on all of ARC-E on a GPU it stayed at chance,
# docs/FINDINGS.md); large models follow the papers' letter protocol. ``auto`` decides by the loaded model's size,
# so the same model gets the same format whether it is named by its spec, a .gguf path or a directory.
CLOZE_BY_DEFAULT = {DEFAULT_MODEL, TINY_MODEL}
CLOZE_MAX_PARAMS = 1_000_000_000  # ``auto``: cloze below this many parameters, letter from it on


def resolve_format(fmt: str, model_spec: str, model: torch.nn.Module | None = None) -> str:
    """``letter`` / ``cloze`` as given; ``auto``: cloze for a ``model`` under :data:`CLOZE_MAX_PARAMS` parameters
    (without the model: for the built-in small specs only)."""
    if fmt != "auto":
        try:
            return ChoiceFormat(fmt).value
        except ValueError:
            raise ConfigError(f"Expected `format` to be one of {[f.value for f in ChoiceFormat] + ['auto']}, but got "
                              f"{fmt!r}") from None
    if model is not None:
        small = sum(p.numel() for p in model.parameters()) < CLOZE_MAX_PARAMS
    else:
        small = resolve_spec(model_spec) in CLOZE_BY_DEFAULT
    return ChoiceFormat.CLOZE.value if small else ChoiceFormat.LETTER.value


#: training seeds are 32-bit, as in numpy and most tools (the seeds derived from them, such as a data order's, stay
#: within 64 bits); a sampling seed (eval, bayesianize, a served request) is any torch generator seed below 2^63
MAX_SEED = 2**32 - 1
MAX_SAMPLING_SEED = 2**63 - 1
#: epochs of a run planned by `epochs` (NaN and inf are not numbers of epochs)
MAX_EPOCHS = 1e6


def check_seed(seed, upper: int = MAX_SEED) -> int:
    """``seed`` if it is an int in [0, upper], else a :class:`ConfigError` naming it."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= upper:
        raise ConfigError(f"Expected a seed from 0 to {upper}, but got {seed!r}")
    return seed


class ConfigError(ValueError):
    """An invalid training option."""


@dataclass
class TrainConfig:
    """Everything :func:`bayeslora.train` needs, with the CLI's defaults (``bayeslora train --help``); each field's
    ``metadata['help']`` says what it does. Checked on creation: a value of the wrong type or out of range is a
    :class:`ConfigError` naming the field. Written resolved to the run's ``run.json``."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "base model spec (see bayeslora.models)"})
    dataset: str = field(default="arith", metadata={"help": "task name or user .jsonl/.csv file"})
    method: str = field(default="mle", metadata={"help": "registered method (bayeslora methods)"})
    method_options: dict = field(default_factory=dict, metadata={"help": "options of the method's config"})
    format: str = field(default="auto", metadata={"help": "letter | cloze | auto (cloze for small models)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                                                          "float32, bfloat16 or float16"})
    data_dir: str | None = field(default=None, metadata={"help": "benchmark data folder ($BAYESLORA_DATA)"})
    source: str = field(default="local", metadata={"help": "local files or the Hugging Face hub"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lr: float = field(default=3e-4, metadata={"help": "AdamW peak learning rate"})
    batch_size: int = field(default=8, metadata={"help": "questions per optimizer step (all processes)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps (overrides epochs when > 0)"})
    epochs: float = field(default=0.0, metadata={"help": "epochs over the train split when max_steps is 0"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warmup fraction, then linear decay to 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    max_length: int = field(default=256, metadata={"help": "max tokens per row (prompt truncated on the left)"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training questions"})
    eval_every: int = field(default=0, metadata={"help": "evaluate on eval_split every N steps (0: off)"})
    eval_split: str = field(default="validation", metadata={"help": "split for evaluation during training"})
    eval_dataset: str | None = field(default=None, metadata={
        "help": "task name or data file for evaluation during training (default: the training dataset)"})
    eval_limit: int | None = field(default=200, metadata={"help": "questions used for evaluation during training"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, initialization and sampling"})

    def __post_init__(self):
        for name in ("dataset", "data_dir"):  # a pathlib.Path is as good as its string
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_field_types(self, ConfigError)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"Expected `method_options` to be a dict, but got {self.method_options!r}")
        if self.format != "auto":  # auto is resolved by the training loop, which has the model
            self.format = resolve_format(self.format, self.model)
        if self.dtype not in DTYPES:
            raise ConfigError(f"Expected `dtype` in {sorted(DTYPES)}, but got {self.dtype!r}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Expected `{name}` to be a positive int, but got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"`batch_size` ({self.batch_size}) must be divisible by `grad_accum` ({self.grad_accum})")
        if self.max_steps < 0 or not 0 <= self.epochs <= MAX_EPOCHS or (self.max_steps == 0 and self.epochs == 0):
            raise ConfigError(f"Set a positive `max_steps`, or `max_steps` 0 and `epochs` in (0, {MAX_EPOCHS}], "
                              f"got {self.max_steps!r} and {self.epochs!r}")
        check_seed(self.seed)
        for name in ("eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"Expected `{name}` to be an int >= 0 (0: off), but got {getattr(self, name)!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise ConfigError(f"Expected `eval_limit` to be a positive int (or None: all), but got "
                              f"{self.eval_limit!r}")
        if not self.lr > 0:
            raise ConfigError(f"Expected `lr` > 0, but got {self.lr!r}")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"Expected `max_grad_norm` >= 0 (0: no clipping), but got {self.max_grad_norm!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"Expected `warmup_ratio` in [0, 1), but got {self.warmup_ratio!r}")

    def n_steps(self, n_train: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        # enough steps to see every question `epochs` times (rounding 2.5 steps to 2 left a fifth of them out); the
        # tolerance keeps float noise such as 0.1 * 80 / 8 = 1.0000000000000002 from adding a step
        return max(1, math.ceil(self.epochs * n_train / self.batch_size - 1e-9))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
