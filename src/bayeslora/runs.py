"""A run directory and how to reload it.

Layout::

    RUN_DIR/
      run.json               resolved config: model spec, format, method + its options, adapter, training options
      adapter/               PEFT adapter(s): adapter_config.json + adapter_model.safetensors
      posterior.safetensors  the method's own tensors (scales, temperature, curvature ...), when it has any
      tokenizer/             the tokenizer used in training
      train_log.jsonl        one JSON line per logged step
      checkpoint/            the last training checkpoint (for --resume)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .methods import BayesianMethod, MethodError, build_method, get_method_class
from .methods.base import write_json
from .models import global_rng_kept, load_model, parse_dtype
from .predictive import Predictive
from .scoring import ChoiceScorer, make_scorer
from .tasks.base import MCExample
from .tasks.user import as_examples

RUN_FILE = "run.json"


@dataclass
class Run:
    """A loaded run: the PEFT model with its method, ready to predict."""

    model: torch.nn.Module
    tokenizer: object
    method: BayesianMethod
    scorer: ChoiceScorer
    info: dict = field(default_factory=dict)
    path: Path | None = None

    def predict(self, examples: list[MCExample | dict], n_samples: int | None = None, batch_size: int = 8,
                seed: int = 0, progress: bool = False) -> Predictive:
        """Predictive for a list of questions, each an :class:`MCExample` or a dict as in a JSONL data file,
        ``{"question": str, "choices": [str, ...]}`` (``"answer"`` and ``"id"`` optional; see
        :mod:`bayeslora.tasks.user`). A malformed question is a :class:`~bayeslora.tasks.DatasetError` naming it."""
        from .evaluate import predict_examples

        return predict_examples(self, as_examples(examples, require_answer=False), n_samples=n_samples,
                                batch_size=batch_size, seed=seed, progress=progress)


def write_run_info(run_dir: Path, info: dict) -> None:
    write_json(Path(run_dir) / RUN_FILE, info)


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if Path(run_dir).is_file():
        raise MethodError(f"{run_dir} is a file; expected a run directory (the folder that holds {RUN_FILE})")
    if not Path(run_dir).is_dir():
        raise MethodError(f"Run directory {run_dir} does not exist")
    if not path.is_file():
        hint = ""
        if (Path(run_dir) / "adapter_config.json").is_file():
            hint = (": it is a plain PEFT adapter; make it a run with `bayeslora bayesianize "
                    f"{run_dir} --method temperature|laplace|tfb --model BASE --dataset D --out RUN`")
        raise MethodError(f"{run_dir} is not a bayeslora run: {RUN_FILE} is missing" + hint)
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MethodError(f"{path} is not valid JSON ({exc.msg}); the run is corrupted") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise MethodError(f"{path} is not readable JSON ({type(exc).__name__}); the run is corrupted") from None
    if not isinstance(info, dict):
        raise MethodError(f"{path} holds a JSON {type(info).__name__}, not an object; the run is corrupted")
    for key in ("model", "method", "format"):
        if key not in info:
            raise MethodError(f"{path} lacks the key {key!r}; the run is corrupted")
    for key, kinds, what in RUN_FIELDS:
        if key in info and (not isinstance(info[key], kinds) or isinstance(info[key], bool)):
            raise MethodError(f"{path}: {key!r} should be {what}, got {info[key]!r}; the run is corrupted")
    if info.get("max_length", 1) < 1:
        raise MethodError(f"{path}: 'max_length' should be a positive integer, got {info['max_length']!r}; the run "
                          "is corrupted")
    return info


#: fields of run.json that are read back, and their types (optional ones are checked when present)
RUN_FIELDS = (("model", str, "a string"), ("method", str, "a string"), ("format", str, "a string"),
              ("dtype", str, "a string"), ("max_length", int, "a positive integer"),
              ("method_config", dict, "an object"), ("adapter", dict, "an object"), ("train", dict, "an object"),
              ("dataset", (str, type(None)), "a string"))


def load_run(run_dir: str | Path, device: str | torch.device | None = None, model_spec: str | None = None,
             options: dict | None = None) -> Run:
    """Rebuild base model + adapter + method from ``run_dir`` (``model_spec`` overrides the saved base model).

    ``options``: prediction-time method options over the saved ones (``bayeslora eval|serve --option``), checked
    before the model loads: an option that shapes training or the fit is a :class:`MethodError`.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    saved = info.get("method_config", {})
    if options:
        saved = get_method_class(info["method"]).config_cls.with_prediction_options(saved, options).to_dict()
    method = build_method(info["method"], saved)
    # the dtype the run was trained or fitted in (older runs: the device's default)
    loaded = load_model(model_spec or info["model"], device=device, dtype=parse_dtype(info.get("dtype")))
    with global_rng_kept():  # PEFT initializes the adapter before the saved weights replace it
        model = method.load(loaded.model, run_dir)
    model.eval()
    scorer = make_scorer(info["format"], loaded.tokenizer, max_length=int(info.get("max_length", 256)))
    return Run(model=model, tokenizer=loaded.tokenizer, method=method, scorer=scorer, info=info, path=run_dir)
