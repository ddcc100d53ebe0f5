"""Where does BLoB's predictive uncertainty come from? MC S=10 with the posterior std kept only in the last k
transformer layers (and the LM head) and zeroed below, on a BLoB run of a calibration grid (issue 3: could a cheap
predictive sample only the top of the network?). Prints one JSON row per k and writes them to ``--out``::

    python scripts/blob_last_layers.py runs/fewshot/ablations/blob-rho_lr=0.02 --seed 1 --k 3 --k 8

Compare with the grid's variants (``python -m bayeslora.bench.variants predictive``): k = L is full MC S=10,
the head predictive is k = 0.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from bayeslora.bench.grid import RUNS_DIR, Cell, eval_sets
from bayeslora.bench.variants import load_grid
from bayeslora.evaluate import evaluate_examples
from bayeslora.io_utils import atomic_write_text
from bayeslora.peft_ext import GaussianLoraA, lora_layers
from bayeslora.runs import load_run

LAYER = re.compile(r"layers\.(\d+)\.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--dataset", default="arc-e")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--k", type=int, action="append", required=True, help="layers kept stochastic (repeat)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=None, help="JSONL (default: GRID/variants/last_layers.jsonl)")
    args = parser.parse_args()

    config = load_grid(args.grid)
    examples = eval_sets(config, args.dataset)[args.split]
    run = load_run(args.grid / RUNS_DIR / Cell("blob", args.dataset, args.seed).run_name, model_spec=config.model)
    layers = [(n, m.lora_A["default"]) for n, m in lora_layers(run.model)
              if isinstance(m.lora_A["default"], GaussianLoraA)]
    if not layers:
        raise SystemExit("not a BLoB run: no Gaussian LoRA A")
    saved = {n: a.rho.detach().clone() for n, a in layers}
    depth = 1 + max(int(m.group(1)) for n, _ in layers if (m := LAYER.search(n)))
    rows = []
    for k in args.k:
        for n, a in layers:
            m = LAYER.search(n)
            a.rho.data.copy_(saved[n] if m is None or int(m.group(1)) >= depth - k else torch.zeros_like(saved[n]))
        t0 = time.perf_counter()
        metrics, _ = evaluate_examples(run, examples, n_samples=args.samples,
                                       batch_size=config.preset.eval_batch_size, seed=args.seed)
        rows.append({"grid": str(args.grid), "seed": args.seed, "last_k": k, "layers": depth, "S": args.samples,
                     "split": args.split, "n": len(examples), "acc": metrics["acc"], "ece": metrics["ece"],
                     "nll": metrics["nll"], "mean_epistemic": metrics["mean_epistemic"],
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    out = args.out or args.grid / "variants" / "last_layers.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
