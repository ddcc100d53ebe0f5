"""Cost and quality of the post-hoc methods on a real model; writes docs/results/posthoc.md.

Each phase is its own process (one model load, peak memory = this process's max RSS), so it can run under
``flock /tmp/bayeslora-cpu.lock`` within a few minutes:

    python scripts/posthoc_results.py fit WORK --source MLE_RUN --method laplace --option n_fit=40
    python scripts/posthoc_results.py eval WORK --run mle --split test --limit 64
    python scripts/posthoc_results.py report WORK --out docs/results/posthoc.md

``fit`` writes WORK/runs/<name> and WORK/results/fit-<name>.json; ``eval`` writes WORK/results/eval-<name>.json
(<name> ``mle`` evaluates the source run itself); ``report`` only reads those files.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _write(work: Path, name: str, record: dict) -> None:
    from bayeslora.io_utils import atomic_write_text

    record["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    atomic_write_text(work / "results" / f"{name}.json", json.dumps(record, indent=2) + "\n")


def cmd_fit(args) -> None:
    from bayeslora.cli import _parse_option
    from bayeslora.posthoc import bayesianize

    work = Path(args.work)
    name = args.name or args.method
    options = dict(_parse_option(o) for o in args.option)
    t0 = time.perf_counter()
    out = bayesianize(args.source, args.method, work / "runs" / name, dataset=args.dataset, options=options,
                      limit=args.limit, seed=args.seed)
    wall = time.perf_counter() - t0
    info = json.loads((out / "run.json").read_text())
    source = json.loads((Path(args.source) / "run.json").read_text())
    _write(work, f"fit-{name}", {"name": name, "method": args.method, "options": options, "fit": info["fit"],
                                 "wall_s": wall, "peak_rss_mb": _peak_rss_mb(),
                                 "mle_train_time_s": source.get("train_time_s"), "mle_steps": source.get("steps"),
                                 "mle_n_train": source.get("n_train"),
                                 "mle_batch_size": source.get("train", {}).get("batch_size")})


def cmd_eval(args) -> None:
    from bayeslora.evaluate import evaluate_examples
    from bayeslora.runs import load_run
    from bayeslora.tasks import load_task

    work = Path(args.work)
    run_dir = Path(args.source) if args.run == "mle" else work / "runs" / args.run
    run = load_run(run_dir)
    examples = load_task(args.dataset or run.info["dataset"], args.split, limit=args.limit)
    evaluate_examples(run, examples[:2], n_samples=args.samples, batch_size=args.batch_size)  # warm-up
    result, _ = evaluate_examples(run, examples, n_samples=args.samples, batch_size=args.batch_size, seed=args.seed)
    _write(work, f"eval-{args.run}", {"name": args.run, "split": args.split, "metrics": result,
                                      "peak_rss_mb": _peak_rss_mb()})


def _versions() -> str:
    import peft
    import torch
    import transformers

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    cpu = cpu.split(":", 1)[-1].strip() or platform.processor()
    return (f"{cpu}, 2 cores (shared with other jobs); Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}")


def _source_command(source: str | None) -> list[str]:
    """The ``bayeslora train`` command equivalent to the source run's saved config."""
    if not source:
        return []
    info = json.loads((Path(source) / "run.json").read_text())
    t = info["train"]
    flags = {"--model": info["model"], "--dataset": t["dataset"], "--train-limit": t["train_limit"],
             "--max-steps": t["max_steps"], "--batch-size": t["batch_size"], "--lr": t["lr"], "--seed": t["seed"]}
    return ["bayeslora train " + " ".join(f"{k} {v}" for k, v in flags.items() if v is not None)
            + f" --out {source}  # train_time_s={info.get('train_time_s')}"]


def _findings(fits: list[dict]) -> list[str]:
    """Sentences derived from the fitted values (no number typed by hand)."""
    out = []
    for f in fits:
        fit = f["fit"]
        if f["method"] == "temperature" and fit["temperature"] < 1:
            out.append(f"- The fitted temperature is {fit['temperature']:.3f} < 1: the source adapter is "
                       "*under*confident on validation, so methods that only add uncertainty cannot lower its NLL.")
        if f["method"] == "laplace" and fit.get("prior_precision", 0) >= 1e8:
            out.append(f"- `{f['name']}`: the validation-NLL prior precision hit the top of the grid "
                       f"({fit['prior_precision']:.0e}): validation prefers no weight uncertainty (Laplace = MAP).")
    return out + [""] if out else []


def cmd_report(args) -> None:
    from bayeslora.io_utils import atomic_write_text

    work = Path(args.work)
    res = {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))}
    fits = [v for k, v in res.items() if k.startswith("fit-")]
    evals = {v["name"]: v for k, v in res.items() if k.startswith("eval-")}
    lines = ["# Post-hoc methods: cost and quality", "", f"Hardware/software: {_versions()}.", "",
             "Generated by `scripts/posthoc_results.py` (commands at the end). The source is an MLE adapter trained "
             "for exactly one epoch on the fit data, so its training time is the epoch time; Laplace/TFB fit on "
             "the same training questions, temperature on validation. Fit time excludes model loading; peak RSS "
             "is the whole process (model included). Predictive cost = evaluation wall time / the source "
             "adapter's deterministic evaluation on the same questions. The machine's 2 cores were shared with "
             "other jobs, so absolute times are noisy; ratios were measured under the same conditions.", ""]
    if fits:
        f0 = fits[0]
        epoch = f0["mle_train_time_s"] * (f0["mle_n_train"] / (f0["mle_steps"] * f0["mle_batch_size"]))
        lines += ["## Fit cost vs one MLE training epoch on the same data", "",
                  f"MLE epoch ({f0['mle_n_train']} questions, batch {f0['mle_batch_size']}): {epoch:.1f} s "
                  f"(measured: {f0['mle_steps']} steps in {f0['mle_train_time_s']:.1f} s).", "",
                  "| fit | options | fit time (s) | / MLE epoch | peak RSS (MB) | fitted |",
                  "|---|---|---|---|---|---|"]
        for f in fits:
            fitted = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in f["fit"].items()
                      if k not in ("split", "seed", "time_s")}
            lines.append(f"| {f['name']} | `{json.dumps(f['options'])}` | {f['fit']['time_s']:.1f} | "
                         f"{f['fit']['time_s'] / epoch:.2f} | {f['peak_rss_mb']:.0f} | `{json.dumps(fitted)}` |")
        lines += ["", "Laplace's fit cost is one forward+backward per curvature question (`n_fit`) plus Jacobians of the "
                  "validation questions for `prior=val_nll`; the evidence-based prior costs nothing extra. TFB's is "
                  "`(search_steps + 2) * n_anchor * search_samples` forward-only question passes (plus "
                  "`2 * n_anchor`).", ""]
        lines += _findings(fits)
    if evals:
        base = evals.get("mle")
        lines += ["## Quality and predictive cost", "",
                  "| run | n | acc | ECE (%) | NLL | Brier | eval time (s) | / deterministic | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, e in evals.items():
            m = e["metrics"]
            ratio = m["eval_time_s"] / base["metrics"]["eval_time_s"] if base else float("nan")
            lines.append(f"| {name} | {m['n']} | {m['acc']:.3f} | {m['ece']:.2f} | {m['nll']:.4f} | "
                         f"{m['brier']:.4f} | {m['eval_time_s']:.1f} | {ratio:.2f} | {e['peak_rss_mb']:.0f} |")
        lines.append("")
    lines += ["## Commands", "", "```"] + _source_command(args.source) + [v["command"] for v in res.values()] + [
        f"python {' '.join(shlex.quote(a) for a in sys.argv)}", "```", ""]
    atomic_write_text(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("fit")
    p.add_argument("work")
    p.add_argument("--source", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--name", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[])
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval")
    p.add_argument("work")
    p.add_argument("--source", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report")
    p.add_argument("work")
    p.add_argument("--out", default="docs/results/posthoc.md")
    p.add_argument("--source", default=None, help="the source MLE run (its training command is listed)")
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
