"""What a calibration grid's cells look like under other settings (issue 3): other predictives of the same trained
runs, and re-trained cells with one method option changed (ablations). Both reuse the grid's protocol, evaluation
subsets and cell machinery, so their numbers sit next to the grid's::

    python -m bayeslora.bench.variants predictive runs/fewshot     # BLoB: MC S=2/10/40, antithetic S=2/10, head
                                                                   # S=10, posterior mean, mean prompt; MLE;
                                                                   # sgp: S = 1, 4, 10, 32; TFB: MC and
                                                                   # antithetic S=4
    python -m bayeslora.bench.variants ablate runs/fewshot --method blob --option init_eps=0.3
    python -m bayeslora.bench.variants report runs/fewshot --md docs/results/methods.md

``predictive`` writes ``GRID/variants/predictive.jsonl`` (one row per run x variant, finished rows skipped);
``ablate`` runs a grid of the one method in ``GRID/ablations/NAME`` (resumable like any grid).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..io_utils import atomic_write_text
from .environment import environment_lines
from .grid import GRID_FILE, MLE, RUNS_DIR, Cell, GridError, _run_done, config_from_dict, make_config, \
    read_results, run_grid

VARIANTS_DIR = "variants"
ABLATIONS_DIR = "ablations"
PREDICTIVE_FILE = "predictive.jsonl"
#: predictive variants per method: (label, method-config overrides, n_samples); MLE's deterministic forward is the
#: cost reference of every ratio
PREDICTIVES: dict[str, list[tuple[str, dict, int]]] = {
    "mle": [("deterministic", {}, 0)],
    "blob": [("MC S=10", {"predictive": "mc"}, 10), ("head S=10", {"predictive": "head"}, 10),
             ("posterior mean", {}, 0), ("MC S=2", {"predictive": "mc"}, 2),
             ("antithetic S=2", {"predictive": "antithetic"}, 2),
             ("antithetic S=10", {"predictive": "antithetic"}, 10),
             ("MC S=40", {"predictive": "mc"}, 40),
             ("mean prompt, antithetic S=2", {"predictive": "antithetic", "prompt": "mean"}, 2),
             ("mean prompt, MC S=10", {"predictive": "mc", "prompt": "mean"}, 10),
             ("mean prompt, antithetic S=10", {"predictive": "antithetic", "prompt": "mean"}, 10)],
    "sgp": [("S=1", {}, 1), ("S=4", {}, 4), ("S=10", {}, 10), ("S=32", {}, 32)],
    "tfb": [("linearized (glm)", {"predictive": "glm"}, 4), ("MC S=4", {"predictive": "mc"}, 4),
            ("antithetic S=4", {"predictive": "antithetic"}, 4)],
}
REFERENCE = ("mle", "deterministic")
MC_REFERENCE = ("blob", "MC S=10")


def load_grid(grid: Path):
    path = Path(grid) / GRID_FILE
    if not path.is_file():
        raise GridError(f"{grid} is not a calibration grid folder (no {GRID_FILE})")
    return config_from_dict(json.loads(path.read_text())["config"])


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- predictive variants --------------------------------------------------------------------------------------------
def run_predictive(grid: Path, split: str = "test", log=print, methods: list[str] | None = None,
                   seeds: list[int] | None = None, max_samples: int | None = None) -> list[dict]:
    """Evaluate every finished run of the methods in :data:`PREDICTIVES` (or ``methods``; ``seeds``: only those)
    under each variant (up to ``max_samples`` samples) on the grid's ``split`` subset (the same questions as the
    grid's table)."""
    from ..evaluate import evaluate_examples
    from ..runs import load_run
    from .grid import eval_sets

    grid = Path(grid)
    config = load_grid(grid)
    out = grid / VARIANTS_DIR / PREDICTIVE_FILE
    rows = _read_jsonl(out)
    done = {(r["method"], r["dataset"], r["seed"], r["variant"]) for r in rows}
    unknown = sorted(set(methods or []) - set(PREDICTIVES))
    if unknown:
        raise GridError(f"No predictive variants for {unknown}; known: {sorted(PREDICTIVES)}")
    cells = [r for r in read_results(grid) if r.get("status") == "ok" and r["method"] in (methods or PREDICTIVES)
             and (not seeds or r["seed"] in seeds)]
    for cell in cells:
        todo = [v for v in PREDICTIVES[cell["method"]]
                if (cell["method"], cell["dataset"], cell["seed"], v[0]) not in done
                and (max_samples is None or v[2] <= max_samples)]
        if not todo:
            continue
        examples = eval_sets(config, cell["dataset"]).get(split)
        if examples is None:
            raise GridError(f"Dataset {cell['dataset']!r} has no {split!r} split in this grid")
        run = load_run(grid / RUNS_DIR / Cell(cell["method"], cell["dataset"], cell["seed"]).run_name,
                       model_spec=config.model)
        base = run.method.config.to_dict()
        for label, overrides, n_samples in todo:
            run.method.config = type(run.method.config).from_dict({**base, **overrides})
            evaluate_examples(run, examples[:8], n_samples=n_samples, batch_size=config.preset.eval_batch_size,
                              seed=cell["seed"])  # warm-up: the first batch pays one-off costs
            metrics, _ = evaluate_examples(run, examples, n_samples=n_samples,
                                           batch_size=config.preset.eval_batch_size, seed=cell["seed"])
            row = {"method": cell["method"], "dataset": cell["dataset"], "seed": cell["seed"], "variant": label,
                   "split": split, **metrics}
            rows.append(row)
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
            log(f"{cell['method']} {cell['dataset']} s{cell['seed']} {label}: NLL {metrics['nll']:.4f} "
                f"ECE {metrics['ece']:.2f} in {metrics['eval_time_s']:.1f} s")
    return rows


# -- ablations ------------------------------------------------------------------------------------------------------
def parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise GridError(f"Expected an option KEY=VALUE, but got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def ablation_name(method: str, options: dict) -> str:
    return method + "-" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def run_ablation(grid: Path, method: str, options: dict, seeds: list[int] | None = None, log=print) -> Path:
    """Train and evaluate ``method`` with ``options`` (on top of the preset's) under the grid's protocol."""
    from ..methods import get_method_class

    grid = Path(grid)
    config = load_grid(grid)
    name = ablation_name(method, options)
    merged = dict(config.preset.method_options)
    merged[method] = {**merged.get(method, {}), **options}
    preset = replace(config.preset, name=f"{config.preset.name}+{name}", method_options=merged)
    out = grid / ABLATIONS_DIR / name
    if getattr(get_method_class(method), "posthoc", False):
        # the ablation changes only the post-hoc method: reuse the grid's finished MLE runs instead of retraining
        for dataset in config.datasets:
            for seed in seeds or config.seeds:
                source = grid / RUNS_DIR / Cell(MLE, dataset, seed).run_name
                target = out / RUNS_DIR / source.name
                if _run_done(source) and not target.exists():
                    shutil.copytree(source, target)
    sub = make_config(str(out), preset, methods=[method], datasets=config.datasets, seeds=seeds or config.seeds,
                      model=config.model, data_dir=config.data_dir, ood_train=config.ood_train,
                      ood_tasks=config.ood_tasks,
                      command=f"python -m bayeslora.bench.variants ablate {grid} --method {method} "
                      + " ".join(f"--option {k}={json.dumps(v)}" for k, v in options.items()))
    run_grid(sub, log=log, subprocesses=True)
    return out


# -- report ---------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def posterior_std_summary(run_dir: Path, model: str) -> dict | None:
    """Mean posterior std of the Gaussian LoRA ``A`` entries and mean ``|A|`` (None for other methods)."""
    from ..peft_ext import stochastic_layers
    from ..runs import load_run

    run = load_run(run_dir, model_spec=model)
    layers = [layer for layer in stochastic_layers(run.model) if hasattr(layer, "std")]
    if not layers:
        return None
    with torch.no_grad():
        std = torch.cat([layer.std().flatten().float() for layer in layers])
        mean = torch.cat([layer.weight.flatten().float() for layer in layers])
    return {"std": std.mean().item(), "abs_mean": mean.abs().mean().item()}


def _ablation_folders(grid: Path, methods: list[str] | None = None) -> list[Path]:
    """The grid's ablation folders (those of ``methods`` only, when given)."""
    folder = Path(grid) / ABLATIONS_DIR
    found = sorted(p for p in folder.glob("*") if (p / GRID_FILE).is_file()) if folder.is_dir() else []
    return [p for p in found if methods is None or p.name.split("-", 1)[0] in methods]


def predictive_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no predictive variants evaluated yet)"]
    # time reference: the MLE deterministic forward of the same seed, in the same grid or ablation folder (group)
    ref_time = {(r.get("group", ""), r["dataset"], r["seed"]): r["eval_time_s"] for r in rows
                if (r["method"].split(" (")[0], r["variant"]) == REFERENCE}
    # NLL reference: the MC S=10 predictive of the same run (same method label, dataset and seed)
    ref_nll = {(r["method"], r["dataset"], r["seed"]): r["nll"] for r in rows if r["variant"] == MC_REFERENCE[1]}
    lines = ["| method | predictive | seeds | ACC (%) | ECE (%) | NLL | NLL vs MC S=10 (%) | eval time vs MLE |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for method, variant in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        sel = sorted((r for r in rows if (r["method"], r["variant"]) == (method, variant)),
                     key=lambda r: (r["dataset"], r["seed"]))
        keys = [(r["dataset"], r["seed"]) for r in sel]
        rel_nll = [100 * (r["nll"] / ref_nll[method, *k] - 1) for r, k in zip(sel, keys, strict=True)
                   if (method, *k) in ref_nll]
        times = [(r["eval_time_s"], ref_time.get((r.get("group", ""), *k), ref_time.get(("", *k))))
                 for r, k in zip(sel, keys, strict=True)]
        rel_time = [t / ref for t, ref in times if ref]
        lines.append(f"| {method} | {variant} | {','.join(str(r['seed']) for r in sel)} | "
                     f"{_mean_std([100 * r['acc'] for r in sel], 1)} | {_mean_std([r['ece'] for r in sel], 2)} | "
                     f"{_mean_std([r['nll'] for r in sel], 3)} | {_mean_std(rel_nll, 2)} | "
                     f"{_mean_std(rel_time, 2)}x |")
    return lines


def ablation_table(grid: Path, config, split: str, methods: list[str]) -> list[str]:
    """The grid's own cells of ``methods`` next to the ablations of ``methods``, on ``split``."""
    groups: list[tuple[str, Path, list[dict]]] = [("grid (preset defaults)", grid, read_results(grid))]
    groups += [(folder.name, folder, read_results(folder)) for folder in _ablation_folders(grid, methods)
               if (folder / "results.jsonl").is_file()]
    lines = ["| cells | method | seeds | ACC (%) | ECE (%) | NLL | mean epistemic | posterior std of A | mean abs A |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, folder, rows in groups:
        for method in dict.fromkeys(r["method"] for r in rows):
            if method not in methods:
                continue
            sel = sorted((r for r in rows if r["method"] == method and r.get("status") == "ok"
                          and split in r["metrics"]), key=lambda r: (r["dataset"], r["seed"]))
            if not sel:
                continue
            m = [r["metrics"][split] for r in sel]
            stats = [posterior_std_summary(folder / RUNS_DIR / Cell(method, r["dataset"], r["seed"]).run_name,
                                           config.model) for r in sel]
            stats = [s for s in stats if s]
            lines.append(f"| {label} | {method} | {','.join(str(r['seed']) for r in sel)} | "
                         f"{_mean_std([100 * x['acc'] for x in m], 1)} | {_mean_std([x['ece'] for x in m], 2)} | "
                         f"{_mean_std([x['nll'] for x in m], 3)} | "
                         f"{_mean_std([x.get('mean_epistemic', 0.0) for x in m], 4)} | "
                         f"{_mean_std([s['std'] for s in stats], 4)} | "
                         f"{_mean_std([s['abs_mean'] for s in stats], 4)} |")
    return lines


def ece_noise_floor(probs: torch.Tensor, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the ECE of a model that is calibrated by construction: labels drawn from its own ``probs``.
    What ECE shows on a set this small from sampling noise alone."""
    from ..metrics import ece

    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([ece(probs, torch.multinomial(probs, 1, generator=g).squeeze(-1)) for _ in range(draws)])
    return values.mean().item(), values.std().item()


def noise_floor_lines(grid: Path, split: str) -> list[str]:
    from safetensors.torch import load_file

    from .grid import CELLS_DIR

    lines = []
    for row in sorted(read_results(grid), key=lambda r: (r["dataset"], r["seed"])):
        if row["method"] != "mle" or row.get("status") != "ok":
            continue
        path = grid / CELLS_DIR / Cell(row["method"], row["dataset"], row["seed"]).key / f"{split}.safetensors"
        if path.is_file():
            probs = load_file(path)["probs"].double()
            mean, std = ece_noise_floor(probs / probs.sum(-1, keepdim=True))
            lines.append(f"- {row['dataset']} seed {row['seed']}: {len(probs)} questions, ECE {mean:.1f} ± {std:.1f}% "
                         f"(the run's measured ECE: {row['metrics'][split]['ece']:.1f}%)")
    return lines


def report(grid: Path, split: str = "test", ablations: list[str] | None = None) -> str:
    """The Markdown fragment; ``ablations`` (method names): only the ablations of those methods (and the predictive
    variants of their runs)."""
    grid = Path(grid)
    config = load_grid(grid)
    rows = _read_jsonl(grid / VARIANTS_DIR / PREDICTIVE_FILE)
    if ablations:  # only the predictives of those ablations' runs; the grid's MLE forward stays as time reference
        rows = [r for r in rows if (r["method"], r["variant"]) == REFERENCE]
    for folder in _ablation_folders(grid, ablations):  # predictives of ablated runs, labelled with the ablation
        rows += [{**r, "method": f"{r['method']} ({folder.name.split('-', 1)[1]})", "group": folder.name}
                 for r in _read_jsonl(folder / VARIANTS_DIR / PREDICTIVE_FILE)]
    ablated = sorted({p.name.split("-", 1)[0] for p in _ablation_folders(grid, ablations)})
    methods = ["mle", *ablated]
    predictives = [
        "### Predictives of the same trained runs", "",
        "`python -m bayeslora.bench.variants predictive "
        + (f"{grid / ABLATIONS_DIR}/FOLDER --methods mle,{','.join(ablations)}` on each ablation folder"
           if ablations else f"{grid}`") + ". Eval time: wall time of the whole "
        "subset after one warm-up batch, as a ratio to the MLE run's deterministic forward of the same seed "
        "(measured in one process, one after the other).", "",
        *predictive_table(rows), ""] if not ablations or any(r.get("group") for r in rows) else []
    title = "predictive variants and ablations" if not ablations else f"ablations of {', '.join(ablations)}"
    lines = [f"## Methods: {title} (`python -m bayeslora.bench.variants`)", "",
             f"On the cells of the calibration grid `{grid}` (preset `{config.preset.name}`: "
             f"{config.preset.description}); every number is on the grid's fixed `{split}` subset. Mean ± sample std "
             "over seeds.", "",
             *predictives,
             "### ECE noise floor", "",
             f"ECE of the MLE run's own `{split}` predictions with the labels redrawn from those predictions (a model "
             "calibrated by construction), 2000 draws: what ECE shows on this many questions from sampling noise "
             "alone.", "",
             *(noise_floor_lines(grid, split) or ["(no MLE cell)"]), "",
             "### Ablations (re-trained cells with one method option changed)", "",
             "Each row after the first group: `python -m bayeslora.bench.variants ablate " + str(grid)
             + " --method M --option KEY=VALUE` (the row's name). Posterior std of A: the mean over every entry of "
               "the Gaussian LoRA A matrices after training (BLoB initializes it at rho^2 with rho ~ U(eps/sqrt 2, "
               "eps)).", "",
             *ablation_table(grid, config, split, methods), "",
             *environment_lines()]
    return "\n".join(lines) + "\n"


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bayeslora.bench.variants", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pred = sub.add_parser("predictive", help="evaluate the grid's runs under the predictive variants")
    pred.add_argument("grid")
    pred.add_argument("--split", default="test")
    pred.add_argument("--methods", default=None, help=f"comma-separated, among {sorted(PREDICTIVES)} (default: all)")
    pred.add_argument("--seeds", default=None, help="comma-separated seeds (default: every seed of the grid)")
    pred.add_argument("--max-samples", type=int, default=None, help="skip variants with more samples than this")
    abl = sub.add_parser("ablate", help="re-train one method with changed options under the grid's protocol")
    abl.add_argument("grid")
    abl.add_argument("--method", required=True)
    abl.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", required=True)
    abl.add_argument("--seeds", default=None, help="comma-separated seeds (default: the grid's)")
    rep = sub.add_parser("report", help="write the Markdown fragment")
    rep.add_argument("grid")
    rep.add_argument("--md", required=True)
    rep.add_argument("--split", default="test")
    rep.add_argument("--ablations", default=None, metavar="METHODS",
                     help="comma-separated methods: only their ablations, next to the grid's MLE cells")
    args = parser.parse_args(argv)
    try:
        if args.command == "predictive":
            run_predictive(Path(args.grid), args.split, methods=_csv(args.methods),
                           seeds=[int(x) for x in _csv(args.seeds) or []], max_samples=args.max_samples)
        elif args.command == "ablate":
            options = dict(parse_option(o) for o in args.option)
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            print(f"wrote {run_ablation(Path(args.grid), args.method, options, seeds)}")
        else:
            atomic_write_text(Path(args.md), report(Path(args.grid), args.split, ablations=_csv(args.ablations)))
            print(f"wrote {args.md}")
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
