"""``bayeslora demo``: the whole story on the default model, offline, on a CPU.

1. zero-shot evaluation of the base model on the built-in task (``arith``) and its OOD companion (``arith-ood``);
2. LoRA fine-tuning on ``arith`` with each demo method;
3. the same evaluations after fine-tuning, a table (accuracy, ECE, NLL, mean epistemic uncertainty) and a
   reliability diagram per method and evaluation set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import TrainConfig, resolve_format
from .evaluate import evaluate_examples, write_evaluation
from .io_utils import atomic_write_text
from .methods import build_method
from .models import load_model
from .runs import Run, load_run
from .scoring import make_scorer
from .tasks import load_task
from .train import train

DEFAULT_DEMO_METHODS = ("mle", "blob")
# BLoB predicts with its cheap head predictive in the demo: the trunk runs once, 10 samples of the LM head's LoRA
# (measured in docs/RESULTS.md against full 10-sample MC).
DEMO_METHOD_OPTIONS = {"blob": {"predictive": "head"}}
EVAL_SETS = (("arith", "in-distribution"), ("arith-ood", "out-of-distribution"))


def _base_run(model_spec: str, fmt: str, max_length: int) -> Run:
    loaded = load_model(model_spec)
    return Run(model=loaded.model, tokenizer=loaded.tokenizer, method=build_method("mle"),
               scorer=make_scorer(resolve_format(fmt, model_spec, loaded.model), loaded.tokenizer, max_length))


def _evaluate_all(run: Run, label: str, sets: dict, out: Path) -> dict:
    results = {}
    for name, examples in sets.items():
        result, pred = evaluate_examples(run, examples, progress=True)
        write_evaluation(out / label / name, examples, pred, result, title=f"{label} on {name}")
        results[name] = result
    return results


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    header = f"| {'model':<22} | {'eval set':<10} | {'acc %':>6} | {'ECE %':>6} | {'NLL':>6} | {'epistemic':>9} |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for label, name, r in rows:
        lines.append(f"| {label:<22} | {name:<10} | {100 * r['acc']:6.1f} | {r['ece']:6.2f} | {r['nll']:6.3f} | "
                     f"{r['mean_epistemic']:9.4f} |")
    return "\n".join(lines)


def demo_markdown(report: dict) -> str:
    """The demo's results as a Markdown fragment for docs/results/ (command, hardware, wall time, table)."""
    from .bench.environment import environment_lines

    rows = [(label, name, r) for label, per in report["results"].items() for name, r in per.items()]
    return "\n".join([
        "# Demo: LoRA fine-tuning of SmolLM2-135M on the built-in task, before vs after", "",
        f"Command: `{report['command']}` ({report['steps']} training steps per method, batch 8, "
        f"{report['eval_limit']} validation questions per evaluation set; BLoB predicts with its head predictive, "
        "S = 10).", "",
        *environment_lines(), "",
        f"Wall time of the whole demo (model loads, 3 x 2 evaluations, 2 trainings): **{report['elapsed_s'] / 60:.1f} "
        "min**.", "",
        "`arith`: in-distribution (addition, the training task); `arith-ood`: subtraction and multiplication, never "
        "trained on. ECE in percent (15 bins); epistemic = mean mutual information over samples (nats).", "",
        format_table(rows), ""])


def run_demo(out: Path, model: str = "smollm2-135m", steps: int = 60, eval_limit: int = 200,
             methods: list[str] | tuple[str, ...] = DEFAULT_DEMO_METHODS, seed: int = 0, md: Path | None = None,
             command: str = "bayeslora demo") -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(model=model, dataset="arith", max_steps=steps, seed=seed, save_every=0)
    sets = {name: load_task(name, "validation", limit=eval_limit) for name, _ in EVAL_SETS}
    print(f"[demo] zero-shot evaluation of {model} on {', '.join(sets)}", flush=True)
    results = {"before fine-tuning": _evaluate_all(_base_run(model, config.format, config.max_length),
                                                   "base", sets, out)}
    for method in methods:
        print(f"[demo] fine-tuning with {method} for {steps} steps", flush=True)
        run_dir = out / f"run-{method}"
        cfg = TrainConfig(**{**config.to_dict(), "method": method,
                             "method_options": DEMO_METHOD_OPTIONS.get(method, {})})
        train(cfg, run_dir, resume=(run_dir / "checkpoint").is_dir())
        results[f"LoRA {method}"] = _evaluate_all(load_run(run_dir), method, sets, out)
    rows = [(label, name, r) for label, per in results.items() for name, r in per.items()]
    table = format_table(rows)
    elapsed = time.perf_counter() - t0
    report = {"model": model, "steps": steps, "eval_limit": eval_limit, "elapsed_s": round(elapsed, 1),
              "command": command, "results": results}
    atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
    markdown = demo_markdown(report)
    atomic_write_text(out / "demo.md", markdown)
    if md is not None:
        atomic_write_text(Path(md), markdown)
    print(table)
    print(f"[demo] done in {elapsed / 60:.1f} min; reliability diagrams under {out}/<model>/<set>/reliability.png")
    return report
