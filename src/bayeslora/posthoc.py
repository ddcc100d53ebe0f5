"""Post-hoc Bayesianization: turn a trained LoRA adapter into a run of a post-hoc method, without retraining.

``bayesianize(source, method, out, ...)`` loads the base model with the adapter of ``source`` — one of our run
directories (MLE/MAP: it has ``run.json``) or a plain PEFT LoRA adapter directory saved by another tool
(``adapter_config.json`` + ``adapter_model.safetensors``; the base model spec is then given by ``model``) — fits
the post-hoc method (temperature, laplace, tfb ...) on a split of a task, and writes a complete run directory at
``out`` (``run.json``, ``adapter/``, ``posterior.safetensors``, ``tokenizer/``) that ``load_run`` and
``bayeslora eval`` read like any trained run. The directory appears in one rename at the end: nothing is written
at ``out`` unless the fit succeeded.
"""

from __future__ import annotations

import json
import os
import warnings
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MAX_SAMPLING_SEED, check_seed, resolve_format
from .io_utils import atomic_dir, check_writable_folder
from .methods import build_method
from .methods.posthoc_base import PosthocMethod, show_progress
from .methods.base import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, POSTERIOR_FILE, \
    adapter_config_problem, adapter_weights_problem, brief_error
from .models import global_rng_kept, load_model, parse_dtype
from .peft_ext import peft_quietly
from .runs import RUN_FILE, read_run_info, write_run_info
from .scoring import make_scorer
from .tasks import is_user_file, load_task



class PosthocError(ValueError):
    """A source that cannot be Bayesianized, or a fit that failed; the message says what to do."""


@dataclass
class AdapterSource:
    """Where the adapter to Bayesianize comes from and how to score with it."""

    adapter_dir: Path
    model: str
    format: str
    max_length: int
    dataset: str | None
    kind: str  # "run" (a bayeslora run directory) or "peft" (a plain PEFT adapter directory)
    method: str | None  # the source run's method, None for a plain adapter
    adapter: dict  # r, alpha, dropout, target_modules
    dtype: str = "auto"  # the source run's model dtype (a plain adapter: the device's default)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PosthocError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PosthocError(f"{path} must hold a JSON object")
    return value


def _adapter_summary(adapter_dir: Path) -> dict:
    """LoRA hyper-parameters of a PEFT adapter directory (validated enough to give clear errors)."""
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise PosthocError(f"{adapter_dir} is not a LoRA adapter: {ADAPTER_CONFIG} is missing (expected a "
                           f"bayeslora run directory or a PEFT adapter saved with save_pretrained)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise PosthocError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: only safetensors adapters are accepted "
                           "(re-save it with save_pretrained(..., safe_serialization=True))")
    cfg = _read_json(adapter_dir / ADAPTER_CONFIG)
    problem = adapter_config_problem(adapter_dir)
    if problem:
        raise PosthocError(f"{adapter_dir}: {problem}; only LoRA adapters are supported")
    unsupported = [k for k in ("use_dora", "use_rslora") if cfg.get(k)]
    if unsupported:
        raise PosthocError(f"{adapter_dir} holds a LoRA variant ({', '.join(unsupported)} in {ADAPTER_CONFIG}); "
                           "only plain LoRA adapters are supported")
    targets = cfg.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    # trained weights besides the LoRA matrices: kept at their values, outside any posterior
    extra = [name for name, used in (("modules_to_save", bool(cfg.get("modules_to_save"))),
                                     (f"bias={cfg.get('bias')!r}", cfg.get("bias", "none") != "none"),
                                     ("lora_bias", bool(cfg.get("lora_bias")))) if used]
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout", 0.0),
            "target_modules": targets, "base_model": cfg.get("base_model_name_or_path"),
            **({"not_in_posterior": extra} if extra else {})}


def _has_posterior(run_dir: Path) -> bool:
    """Whether the run saved posterior tensors (an empty posterior file only names the method)."""
    from safetensors import safe_open

    path = run_dir / POSTERIOR_FILE
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return len(list(fh.keys())) > 0
    except Exception as exc:  # noqa: BLE001
        raise PosthocError(f"{path} is not a readable safetensors file ({exc}); the source run is corrupted") from exc


def resolve_source(source: str | Path, model: str | None = None) -> AdapterSource:
    """Inspect ``source`` (run directory or plain PEFT adapter directory) without loading any weights."""
    source = Path(source)
    if not source.is_dir():
        raise PosthocError(f"Source {source} is not a directory (expected a run directory or a PEFT adapter)")
    if (source / RUN_FILE).is_file():
        info = read_run_info(source)
        adapter_dir = source / ADAPTER_DIR
        if _has_posterior(source) or any((d / ADAPTER_CONFIG).is_file() for d in adapter_dir.glob("*/")):
            raise PosthocError(f"Source run {source} uses method {info['method']!r}, which has a posterior of its "
                               "own; post-hoc methods start from one deterministic adapter (an mle or map run)")
        summary = _adapter_summary(adapter_dir)
        return AdapterSource(adapter_dir=adapter_dir, model=model or info["model"], format=info["format"],
                             max_length=int(info.get("max_length", 256)), dataset=info.get("dataset"), kind="run",
                             method=info["method"], adapter=summary, dtype=info.get("dtype", "auto"))
    summary = _adapter_summary(source)
    spec = model or summary.get("base_model")
    if not spec:
        raise PosthocError(f"{source} is a plain PEFT adapter without a base model name: pass --model SPEC")
    return AdapterSource(adapter_dir=source, model=spec, format="auto", max_length=256,
                         dataset=None, kind="peft", method=None, adapter=summary)


def load_adapter(base_model: torch.nn.Module, adapter_dir: Path):
    """Load a PEFT LoRA adapter onto ``base_model``; every LoRA weight must match the model (else PosthocError)."""
    from peft import PeftModel

    try:
        with global_rng_kept(), peft_quietly():  # PEFT initializes the LoRA weights before the saved ones replace them
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - PEFT raises many types for a mismatched adapter
        raise PosthocError(f"The adapter in {adapter_dir} does not fit the base model (check the base model spec, "
                           f"the adapter's target modules and rank): {brief_error(exc)}") from exc
    problem = adapter_weights_problem(model, adapter_dir)
    if problem:
        raise PosthocError(f"The adapter in {adapter_dir} does not fit the base model: {problem}")
    return model


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PosthocError(f"Output {out} already exists and is not empty: choose another --out")
    try:
        check_writable_folder(out)  # before the fit, which can take minutes
    except ValueError as exc:
        raise PosthocError(str(exc)) from None


def _fit_examples(method: PosthocMethod, dataset: str, split: str | None, data_dir, limit: int | None):
    split = split or method.fit_split
    examples = load_task(dataset, split, data_dir, limit=limit)
    if not examples:
        raise PosthocError(f"The fit set is empty ({dataset!r}, split {split!r}, limit {limit}): "
                           "pass a dataset/split with examples")
    return split, examples


def bayesianize(source: str | Path, method: str, out: str | Path, dataset: str | None = None,
                split: str | None = None, options: dict | None = None, data_dir=None, model: str | None = None,
                limit: int | None = None, seed: int = 0, batch_size: int = 8, progress: bool = False) -> Path:
    """Fit post-hoc ``method`` to the adapter of ``source`` on ``dataset``/``split`` and write a run at ``out``.

    ``split`` defaults to the method's ``fit_split`` (validation for temperature, train for laplace/tfb);
    ``dataset`` defaults to the source run's training task; ``progress``: a bar per pass of the fit (stderr).
    Returns ``out``.
    """
    out = Path(out)
    _check_output(out)
    check_seed(seed, MAX_SAMPLING_SEED)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PosthocError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}")
    meth = build_method(method, options)
    if not isinstance(meth, PosthocMethod):
        raise PosthocError(f"Method {method!r} is trained end to end, not post hoc: use `bayeslora train --method "
                           f"{method}`")
    src = resolve_source(source, model)
    dataset = dataset or src.dataset
    if not dataset:
        raise PosthocError("No fit dataset: pass --dataset (a plain PEFT adapter does not say what it was trained on)")
    dataset = os.fspath(dataset)
    if is_user_file(dataset) and Path(dataset).is_file():
        dataset = str(Path(dataset).resolve())  # run.json must find it from any directory
    split, examples = _fit_examples(meth, dataset, split, data_dir, limit)
    if src.adapter.get("not_in_posterior"):
        warnings.warn(f"The adapter in {src.adapter_dir} also trains {', '.join(src.adapter['not_in_posterior'])}: "
                      "bayeslora's posteriors cover the LoRA A and B matrices only, and keep those at their values "
                      "(recorded in run.json, adapter.not_in_posterior)", stacklevel=2)
    loaded = load_model(src.model, dtype=parse_dtype(src.dtype), progress=progress)
    peft_model = load_adapter(loaded.model, src.adapter_dir)
    peft_model.eval()
    fmt = resolve_format(src.format, src.model, loaded.model)
    scorer = make_scorer(fmt, loaded.tokenizer, max_length=src.max_length)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    extra = {}
    if meth.tune_split is not None:
        # the whole split, from which the method draws its n_val questions at random; `limit` is the fit split's
        # alone: a split's first questions are not a sample of it (ARC-E's first 64 validation questions were
        # harder than 98% of random 64-question draws for the seed-1 cpu-fewshot adapter; FINDINGS, finding 21)
        extra["validation"] = load_task(dataset, meth.tune_split, data_dir)
    t0 = time.perf_counter()
    with show_progress(progress):
        fitted = meth.fit(peft_model, scorer, examples, batch_size=batch_size, generator=generator, **extra)
    fit_time = time.perf_counter() - t0
    info = {"model": loaded.spec, "format": fmt, "dtype": src.dtype, "max_length": src.max_length, "method": meth.name,
            "method_config": meth.config.to_dict(), "adapter": {k: v for k, v in src.adapter.items()
                                                                if k != "base_model"},
            "dataset": dataset, "n_choices": max(ex.n_choices for ex in examples), "status": "done",
            "source": {"path": str(source), "kind": src.kind, "method": src.method},
            "fit": {"split": split, "n_examples": len(examples), "seed": seed, "time_s": round(fit_time, 3),
                    **({"tune_split": meth.tune_split} if meth.tune_split else {}), **fitted}}
    with atomic_dir(out) as tmp:
        meth.save(peft_model, tmp)
        loaded.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_run_info(tmp, info)
    return out


__all__ = ["AdapterSource", "PosthocError", "bayesianize", "load_adapter", "resolve_source"]
