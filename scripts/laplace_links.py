"""Where does Laplace's accuracy go? The linearized predictive of a Laplace run of a calibration grid, under other
links and prior precisions, from ONE pass of Jacobians per question (issue 4: accuracy within 1 point of the input
adapter holds on 2 of 6 seeds; is it the noise of the MC link, the link itself, or the prior?)::

    python scripts/laplace_links.py runs/overfit --seed 1 --seed 2 --seed 3

For each seed and split (the grid's fixed validation and test subsets), each prior precision (the fitted one
times a factor) and each link, one JSON row: accuracy, NLL, ECE and how many answers differ from the input
adapter's (the linearized mean). Links: the probit, the pairwise mean-field, the MC link at the run's sample count
and at 1000 samples, each repeated with ``--draws`` generator seeds (mean and std: the link's own noise), and
``MC 20000``, the converged MC predictive. Rows go to stdout and ``--out`` (default:
GRID/variants/laplace_links.jsonl). The Jacobian features are cached in GRID/variants/laplace_features/ (a rerun
with other links costs seconds; delete the folder after changing a run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bayeslora import metrics
from bayeslora.bench.grid import RUNS_DIR, Cell, eval_sets
from bayeslora.bench.variants import load_grid
from bayeslora.io_utils import atomic_write_text
from bayeslora.methods.linearized import meanfield_probs, probit_probs, sample_logit_gaussian
from bayeslora.runs import load_run

FACTORS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
CONVERGED = 20000


def features(run, examples, batch_size: int):
    """Per batch: the linearized mean logits, the Jacobian features and the Gram (the expensive part)."""
    device = next(run.model.parameters()).device
    n_choices = max(ex.n_choices for ex in examples)
    out = []
    for start in range(0, len(examples), batch_size):
        enc = run.scorer.encode(examples[start:start + batch_size], n_choices=n_choices).to(device)
        out.append(run.method._jacobian_features(run.model, run.scorer, enc))
    return out


def mc_probs(feats, covs, n_samples: int, gen_seed: int) -> torch.Tensor:
    """The MC link's probabilities with ``n_samples`` logit draws from generator seed ``gen_seed``."""
    gen = torch.Generator().manual_seed(gen_seed)
    return torch.cat([sample_logit_gaussian(m, c, n_samples, gen).softmax(-1).mean(0)
                      for (m, _, _), c in zip(feats, covs, strict=True)])


def scores(probs: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    summary = metrics.summary(probs, labels)
    return {"acc": summary["acc"], "nll": summary["nll"], "ece": summary["ece"],
            "changed": int((probs.argmax(-1) != reference).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--dataset", default="arc-e")
    parser.add_argument("--seed", type=int, action="append", required=True, help="grid seed (repeat)")
    parser.add_argument("--draws", type=int, default=20, help="generator seeds of the run's MC link")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    config = load_grid(args.grid)
    sets = eval_sets(config, args.dataset)
    out = args.out or args.grid / "variants" / "laplace_links.jsonl"
    rows = []
    for seed in args.seed:
        run = load_run(args.grid / RUNS_DIR / Cell("laplace", args.dataset, seed).run_name, model_spec=config.model)
        method, fitted = run.method, run.method.prior_precision
        S = method.resolve_samples(None)
        for split, examples in sets.items():
            cache = args.grid / "variants" / "laplace_features" / f"{args.dataset}-s{seed}-{split}.pt"
            t0 = time.perf_counter()
            if cache.is_file():
                feats = torch.load(cache, weights_only=True)
            else:
                feats = features(run, examples, config.preset.eval_batch_size)
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(feats, cache.with_suffix(".tmp"))
                cache.with_suffix(".tmp").replace(cache)
            jac_s = time.perf_counter() - t0
            labels = torch.tensor([ex.label for ex in examples])
            mean = torch.cat([m for m, _, _ in feats])
            adapter = mean.argmax(-1)
            base = {"grid": str(args.grid), "seed": seed, "split": split, "n": len(examples),
                    "fitted_prior_precision": fitted, "jacobian_s": round(jac_s, 1)}
            rows.append({**base, "factor": None, "link": "input adapter", **scores(mean.softmax(-1), labels, adapter)})
            for factor in FACTORS:
                covs = [method._logit_cov(f, g, fitted * factor) for _, f, g in feats]
                probit = torch.cat([probit_probs(m, c) for (m, _, _), c in zip(feats, covs, strict=True)])
                rows.append({**base, "factor": factor, "link": "probit", **scores(probit, labels, adapter)})
                meanfield = torch.cat([meanfield_probs(m, c) for (m, _, _), c in zip(feats, covs, strict=True)])
                rows.append({**base, "factor": factor, "link": "meanfield", **scores(meanfield, labels, adapter)})
                for n in dict.fromkeys((S, 1000)):
                    draws = [scores(mc_probs(feats, covs, n, d), labels, adapter) for d in range(args.draws)]
                    rows.append({**base, "factor": factor, "link": f"MC {n} x{args.draws}",
                                 **{k: statistics.fmean(d[k] for d in draws) for k in draws[0]},
                                 **{f"{k}_std": statistics.stdev(d[k] for d in draws)
                                    for k in ("acc", "nll", "changed")}})
                rows.append({**base, "factor": factor, "link": f"MC {CONVERGED}",
                             **scores(mc_probs(feats, covs, CONVERGED, 0), labels, adapter)})
            for row in rows[-1 - 5 * len(FACTORS):]:
                print(json.dumps(row), flush=True)
            atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        del run
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
