"""How good is a Laplace prior precision tuned on K validation questions, on the test questions? (issue 4: on the
cpu-fewshot adapters, priors tuned on 64 validation questions spanned 56 to 1000 over three seeds, and one of them
made the predictive underconfident; docs/FINDINGS.md, finding 23.)

One pass of Jacobians per question gives the mean-field predictive at every prior precision of the ``val_nll``
grid (the expensive part is the Jacobians, not the prior)::

    python scripts/laplace_prior_rules.py sweep RUN --split validation --sample 200 --out V.safetensors
    python scripts/laplace_prior_rules.py sweep RUN --split test --limit 500 --out T.safetensors
    python scripts/laplace_prior_rules.py sweep RUN1 RUN2 --split test --limit 500 --out T1.safetensors T2.safetensors
    python scripts/laplace_prior_rules.py report --pair V1 T1 --pair V2 T2 --k 64 --plot FIG.png \
        --title TITLE --command "the sweep commands" --md docs/results/FRAGMENT.md

``report`` draws ``--draws`` random K-question subsets of each validation sweep, picks a prior with each rule
(``argmin``: the lowest validation NLL, Laplace's ``val_nll``; ``1se``: the strongest prior whose validation NLL is
within one standard error of the lowest, the error being that of the paired per-question difference), and reports
the test metrics at the picked priors, next to the input adapter, the prior picked by all the validation questions,
and the best prior on the test questions themselves (an oracle no rule can beat).
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

import torch
from eval_table import fragment
from safetensors.torch import load_file, save_file

from bayeslora import metrics
from bayeslora.io_utils import atomic_write_text
from bayeslora.methods.laplace import val_nll_grid
from bayeslora.methods.linearized import lora_jacobians, meanfield_probs
from bayeslora.runs import load_run
from bayeslora.tasks import load_task, random_subset

GRID = val_nll_grid()


def sweep(args) -> None:
    if len(args.out) != len(args.run):
        raise SystemExit(f"{len(args.run)} run(s) but {len(args.out)} --out file(s): give one per run")
    runs = [load_run(path) for path in args.run]
    for path, run in zip(args.run, runs, strict=True):
        if run.info.get("method") != "laplace":
            raise SystemExit(f"{path} is a {run.info.get('method')!r} run, not a Laplace one")
    first = runs[0]
    for path, run in zip(args.run[1:], runs[1:], strict=True):
        mods, ref = run.method.jacobian_modules(), first.method.jacobian_modules()
        if mods.keys() != ref.keys() or any(not torch.equal(mods[k].weight, ref[k].weight) for k in ref):
            raise SystemExit(f"{path} is a Laplace fit of another adapter than {args.run[0]}: the runs of one "
                             "sweep share their Jacobians, so they must differ in the fit alone")
    examples = load_task(first.info["dataset"], args.split, args.data_dir, limit=args.limit)
    examples = random_subset(examples, args.sample)
    device = next(first.model.parameters()).device
    n_choices = max(ex.n_choices for ex in examples)
    means, probs = [], [[] for _ in runs]  # probs: per run, per batch (G, B, C)
    for start in range(0, len(examples), args.batch_size):
        enc = first.scorer.encode(examples[start:start + args.batch_size], n_choices=n_choices).to(device)
        # the mean-field link reads only the logits' differences: their Jacobians, one backward fewer
        mean, jacobians = lora_jacobians(first.model, first.scorer, enc, first.method.jacobian_modules(),
                                         relative=True)
        means.append(mean)
        for run, out in zip(runs, probs, strict=True):
            feats, gram = run.method.project_jacobians(jacobians)
            out.append(torch.stack([meanfield_probs(mean, cov)
                                    for cov in run.method.logit_covs(feats, gram, GRID.tolist())]))
    adapter = torch.cat(means).softmax(-1)
    labels = torch.tensor([ex.label for ex in examples])
    for path, run, out_path, run_probs in zip(args.run, runs, args.out, probs, strict=True):
        tmp = Path(str(out_path) + ".tmp")
        save_file({"grid": GRID, "probs": torch.cat(run_probs, 1).float(), "adapter": adapter, "labels": labels},
                  str(tmp), metadata={"run": str(path), "split": args.split,
                                      "fitted_prior_precision": str(run.method.prior_precision)})
        tmp.replace(out_path)
        print(f"wrote {out_path}: {len(examples)} questions x {len(GRID)} priors")


def per_question_nll(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(G, N) negative log-probability of the label at each prior."""
    return -probs.gather(2, labels[None, :, None].expand(len(probs), -1, 1)).squeeze(2).double().clamp_min(1e-30).log()


def pick(nll: torch.Tensor, rule: str) -> int:
    """Grid index picked from a (G, K) validation NLL matrix."""
    mean = nll.mean(1)
    best = int(mean.argmin())
    if rule == "argmin":
        return best
    diff = nll - nll[best]
    se = diff.std(1) / math.sqrt(nll.shape[1])
    ok = (mean - mean[best] <= se).nonzero().flatten()
    return int(ok.max())


def _draw(n: int, k: int, replace: bool, gen: torch.Generator) -> torch.Tensor:
    """``k`` of ``n`` question indices: with replacement (a bootstrap draw, whose spread is that of ``k`` fresh
    questions from the pool's distribution), or without (the spread shrinks by ``(n - k) / (n - 1)`` in variance)."""
    if replace:
        return torch.randint(n, (k,), generator=gen)
    return torch.randperm(n, generator=gen)[:k]


def scores_by_prior(test: dict) -> list[dict]:
    return [{k: v for k, v in metrics.summary(p, test["labels"]).items() if k in ("acc", "ece", "nll")}
            for p in test["probs"]]


def report(args, argv: list[str]) -> None:
    rows, curves = [], []
    for val_path, test_path in args.pair:
        gen = torch.Generator().manual_seed(0)
        val, test = load_file(val_path), load_file(test_path)
        grid = test["grid"]
        if not torch.equal(grid, val["grid"]) or len(val["labels"]) < max(args.k):
            raise SystemExit(f"{val_path}: another prior grid, or fewer than --k {max(args.k)} questions")
        scores = scores_by_prior(test)
        vnll = per_question_nll(val["probs"], val["labels"])
        adapter = {k: v for k, v in metrics.summary(test["adapter"], test["labels"]).items() if k in ("acc", "ece",
                                                                                                     "nll")}
        picks = {"input adapter": [None]}
        for rule in ("argmin", "1se"):
            picks[f"{rule}, all {vnll.shape[1]}"] = [pick(vnll, rule)]
            for k in args.k:
                picks[f"{rule}, {k} random"] = [pick(vnll[:, _draw(vnll.shape[1], k, args.replace, gen)], rule)
                                                for _ in range(args.draws)]
        picks["oracle: test NLL"] = [min(range(len(grid)), key=lambda g: scores[g]["nll"])]
        picks["oracle: test ECE"] = [min(range(len(grid)), key=lambda g: scores[g]["ece"])]
        name = Path(safe_open_metadata(test_path).get("run", test_path)).name
        curves.append((name, grid, scores, adapter, picks[f"argmin, all {vnll.shape[1]}"][0]))
        for rule, idx in picks.items():
            got = [adapter if g is None else scores[g] for g in idx]
            priors = sorted(float(grid[g]) for g in idx if g is not None)
            rows.append({"run": name, "rule": rule, "prior": _prior_text(priors),
                         **{k: statistics.fmean(s[k] for s in got) for k in ("acc", "ece", "nll")},
                         "ece_sd": statistics.pstdev(s["ece"] for s in got),
                         "worse": statistics.fmean(s["ece"] > adapter["ece"] for s in got)})
    lines = ["| run | rule | prior precision (median, 10-90%) | test ACC % | test ECE % (mean ± sd over draws) "
             "| draws with a higher ECE than the input adapter's | test NLL |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        sd = f" ± {r['ece_sd']:.1f}" if r["ece_sd"] else ""
        lines.append(f"| {r['run']} | {r['rule']} | {r['prior']} | {100 * r['acc']:.1f} | {r['ece']:.1f}{sd} "
                     f"| {100 * r['worse']:.0f}% | {r['nll']:.4f} |")
    print("\n".join(lines))
    if args.plot:
        _plot(curves, args.plot)
    if args.md:
        this = "python scripts/laplace_prior_rules.py " + " ".join(shlex.quote(a) for a in argv)
        how = ("with replacement (bootstrap draws: their spread is that of fresh questions from the same pool)"
               if args.replace else "without replacement, so the spread over draws understates that of fresh "
               "questions, the more so the larger the draw")
        body = [f"{len(test['labels'])} test and {vnll.shape[1]} validation questions per run; {args.draws} random "
                f"draws of {' / '.join(map(str, args.k))} validation questions per rule (generator seed 0; drawn "
                f"from the {vnll.shape[1]} {how})."
                + _figure_text(args.plot), "", *lines]
        atomic_write_text(args.md, "\n".join(fragment(args.title, args.intro, body, [*args.command, this])))
        print(f"wrote {args.md}")


def _figure_text(plot: Path | None) -> str:
    """The figure as RESULTS.md (in docs/) shows it, or its path when it lies outside docs/."""
    if plot is None:
        return ""
    parts = Path(plot).parts
    if parts and parts[0] == "docs":
        return f"\n\n![test NLL and ECE by prior precision]({Path(*parts[1:]).as_posix()})"
    return f" Figure: `{plot}`."


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _prior_text(priors: list[float]) -> str:
    if not priors:
        return "-"
    if len(priors) == 1:
        return f"{priors[0]:.3g}"
    q = lambda f: priors[min(len(priors) - 1, int(f * len(priors)))]  # noqa: E731
    return f"{q(0.5):.3g} ({q(0.1):.3g}-{q(0.9):.3g})"


def _plot(curves, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, grid, scores, adapter, picked), color in zip(curves, colors, strict=False):
        for ax, key in zip(axes, ("nll", "ece"), strict=True):
            ax.plot(grid.numpy(), [s[key] for s in scores], color=color, label=name)
            ax.axhline(adapter[key], color=color, ls=":", lw=1)
            ax.plot([float(grid[picked])], [scores[picked][key]], "o", color=color, ms=5)
    for ax, label in zip(axes, ("test NLL", "test ECE (%)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("prior precision")
        ax.set_ylabel(label)
        ax.set_xlim(1e-1, 1e6)
    axes[0].legend(fontsize=7)
    fig.suptitle("Laplace (all layers, mean-field link) by prior precision; dotted: the input adapter; dot: the prior "
                 "with the lowest NLL on all the validation questions", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("run", type=Path, nargs="+", help="Laplace runs of one adapter (fits differing in their options "
                                                    "share one pass of Jacobians)")
    s.add_argument("--split", default="test")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--sample", type=int, default=None, help="a fixed random subset (eval --sample's draw)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--out", type=Path, nargs="+", required=True, help="one sweep file per run")
    r = sub.add_parser("report")
    r.add_argument("--pair", nargs=2, action="append", required=True, metavar=("VAL", "TEST"))
    r.add_argument("--k", type=int, nargs="+", default=[64], help="validation questions per draw (one or more sizes)")
    r.add_argument("--draws", type=int, default=1000)
    r.add_argument("--replace", action="store_true", help="draw with replacement (bootstrap)")
    r.add_argument("--md", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None)
    r.add_argument("--title", default="Laplace prior precision tuned on random validation questions")
    r.add_argument("--intro", default="")
    r.add_argument("--command", action="append", default=[], help="a command that made the sweeps (repeatable)")
    args = parser.parse_args(argv)
    if args.cmd == "sweep":
        sweep(args)
    else:
        report(args, argv)


if __name__ == "__main__":
    main()
