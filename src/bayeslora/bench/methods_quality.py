"""Quality of the trained methods (issue 3): accuracy / ECE / NLL of mle, map, mcd, ens, blob on the real model.

One *cell* = one (method, seed): train (resumable: rerun the same command after a timeout and it goes on from the
last checkpoint), then evaluate; every evaluation appends one line to ``OUT/results.jsonl`` and finished cells are
skipped. ``report`` turns the lines into ``docs/results/methods.md`` (mean +- std over seeds), with the commands::

    python -m bayeslora.bench.methods_quality cell --out runs/quality --method blob --seed 1
    python -m bayeslora.bench.methods_quality report --out runs/quality --md docs/results/methods.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..io_utils import atomic_write_text
from .environment import environment_lines

RESULTS = "results.jsonl"
# extra evaluations per method: (variant label, method-config overrides, n_samples)
VARIANTS = {
    "blob": [("mc S=10", {}, 10), ("head S=10", {"predictive": "head"}, 10), ("mean S=0", {}, 0)],
    "mcd": [("S=10", {}, 10)],
    "ens": [("K=3", {}, 3)],
}


def _read(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(out: Path, record: dict) -> None:
    rows = _read(out) + [record]
    atomic_write_text(out / RESULTS, "".join(json.dumps(r) + "\n" for r in rows))


def run_cell(args) -> None:
    from ..config import TrainConfig
    from ..evaluate import evaluate_examples
    from ..runs import load_run, read_run_info
    from ..tasks import load_task
    from ..train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = VARIANTS.get(args.method, [("deterministic", {}, 0)])
    done = {(r["method"], r["seed"], r["variant"]) for r in _read(out)}
    if all((args.method, args.seed, v) in done for v, _, _ in variants):
        print(f"{args.method} seed {args.seed}: done already")
        return
    run_dir = out / f"{args.method}-s{args.seed}"
    finished = (run_dir / "run.json").exists() and read_run_info(run_dir).get("status") == "done"
    if not finished:
        config = TrainConfig(model=args.model, dataset=args.dataset, method=args.method, max_steps=args.steps,
                             seed=args.seed, save_every=5, data_dir=args.data_dir)
        train(config, run_dir, resume=run_dir.exists(), progress=False)
    examples = load_task(args.dataset, "validation", args.data_dir, limit=args.eval_limit)
    run = load_run(run_dir)
    info = read_run_info(run_dir)
    base_config = run.method.config.to_dict()
    for variant, overrides, n_samples in variants:
        if (args.method, args.seed, variant) in done:
            continue
        run.method.config = type(run.method.config).from_dict({**base_config, **overrides})
        metrics, _ = evaluate_examples(run, examples, n_samples=n_samples, batch_size=8, seed=args.seed)
        record = {"method": args.method, "seed": args.seed, "variant": variant, "dataset": args.dataset,
                  "steps": args.steps, "train_time_s": info.get("train_time_s"), **metrics}
        _append(out, record)
        print(json.dumps(record), flush=True)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(out: Path, commands: list[str]) -> str:
    rows = _read(out)
    if not rows:
        raise ValueError(f"{out / RESULTS} has no results yet: run some cells first")
    order = ["mle", "map", "mcd", "ens", "blob"]
    keys = sorted({(r["method"], r["variant"]) for r in rows},
                  key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0]))
    first = rows[0]
    lines = [f"Dataset `{first['dataset']}` (validation, first {first['n']} questions), {first['steps']} training "
             "steps, batch 8, lr 3e-4, LoRA r=8 on q_proj, v_proj, lm_head; mean ± std over the seeds listed.", "",
             "| method | predictive | seeds | acc % | ECE % | NLL | Brier | epistemic | eval s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, variant in keys:
        sel = sorted((r for r in rows if r["method"] == method and r["variant"] == variant), key=lambda r: r["seed"])
        cells = [_mean_std([r["acc"] for r in sel], 100, 1), _mean_std([r["ece"] for r in sel]),
                 _mean_std([r["nll"] for r in sel], 1, 3), _mean_std([r["brier"] for r in sel], 1, 3),
                 _mean_std([r["mean_epistemic"] for r in sel], 1, 4), _mean_std([r["eval_time_s"] for r in sel], 1, 0)]
        lines.append(f"| {method} | {variant} | {','.join(str(r['seed']) for r in sel)} | " + " | ".join(cells) + " |")
    lines += ["", "Commands (each cell under `flock /tmp/bayeslora-cpu.lock`, re-run until done):", "", "```"]
    lines += commands + ["```", "", *environment_lines()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bayeslora.bench.methods_quality")
    sub = parser.add_subparsers(dest="command", required=True)
    cell = sub.add_parser("cell", help="train + evaluate one (method, seed)")
    cell.add_argument("--out", required=True)
    cell.add_argument("--method", required=True)
    cell.add_argument("--seed", type=int, default=1)
    cell.add_argument("--model", default="smollm2-135m")
    cell.add_argument("--dataset", default="arc-e")
    cell.add_argument("--steps", type=int, default=100)
    cell.add_argument("--eval-limit", type=int, default=200)
    cell.add_argument("--data-dir", default=None)
    rep = sub.add_parser("report", help="write the markdown table")
    rep.add_argument("--out", required=True)
    rep.add_argument("--md", required=True)
    rep.add_argument("--command", action="append", default=[], help="command line(s) to quote in the report")
    args = parser.parse_args(argv)
    if args.command == "cell":
        run_cell(args)
    else:
        atomic_write_text(Path(args.md), "# Methods: quality on the real model\n\n" + report(Path(args.out),
                                                                                             args.command))
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
