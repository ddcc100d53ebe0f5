"""Benchmark of generation under posterior samples: what each way of drawing the S samples costs in
``bayeslora serve`` decoding, and how much of the full S=10 sampling's per-token epistemic uncertainty it keeps.

    python bench/generation_bench.py RUN_DIR --out docs/results/generation.md

One run (a sampled method: BLoB, TFB, MC-dropout, sgp), loaded once; its prediction options are switched between
rows in this process, as ``bayeslora serve RUN --option KEY=VALUE`` would set them. Prompts: the first ``--prompts``
questions of a dataset split, each as one chat turn (the letter-format question); greedy decoding of exactly
``--max-tokens`` tokens (stop tokens off), so every row emits the same number of tokens. For each prompt the rows
take turns, so that load from other jobs hits them alike. Columns:

* seconds per request (mean) and cost relative to the deterministic decode (S = 1): the median over prompts of
  the time ratio on the same prompt (robust to a burst of load from another job during one prompt);
* the mean per-token epistemic uncertainty (mutual information, nats) and its ratio to the reference row's
  (``MC S=10``): a cheaper row that keeps less of it under-reports what the samples disagree on;
* the rank correlation of the per-token epistemic values with the reference's, over the tokens where both
  emitted the same text so far (does the cheap row point at the same tokens?);
* the share of emitted tokens equal to the deterministic decode's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REFERENCE = "MC S=10"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    samples: int
    options: dict


def rows_for(config) -> list[Row]:
    """The rows this run's method can draw (antithetic rows only where it has an antithetic predictive)."""
    rows = [Row("deterministic (S=1)", 1, {}), Row(REFERENCE, 10, {}), Row("MC S=10, chunks of 2", 10,
                                                                        {"sample_chunk": 2}),
            Row("MC S=4", 4, {}), Row("MC S=10, prompt=mean", 10, {"prompt": "mean"}),
            Row("MC S=4, prompt=mean", 4, {"prompt": "mean"})]
    if _accepts(config, "antithetic"):
        rows += [Row("antithetic S=4", 4, {"predictive": "antithetic"}),
                 Row("antithetic S=2", 2, {"predictive": "antithetic"}),
                 Row("antithetic S=2, prompt=mean", 2, {"predictive": "antithetic", "prompt": "mean"})]
    if _accepts(config, "head"):
        rows.append(Row("head S=10", 10, {"predictive": "head"}))
    if _accepts(config, "glm"):  # TFB: the linearized model, S/2 mirrored pairs and the mean as S + 1 rows
        rows += [Row(f"linearized S={s}", s, {"predictive": "glm"}) for s in (10, 4, 2)]
    return rows


def select_rows(rows: list[Row], names: str | None) -> list[Row]:
    """The rows named in ``names`` (comma-separated), after the deterministic and reference rows, which every
    report needs; all rows for ``None``."""
    if names is None:
        return rows
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - {row.name for row in rows}
    if unknown:
        raise ValueError(f"Unknown rows {sorted(unknown)}; this run has {[row.name for row in rows]}")
    return [row for row in rows if row.name in wanted or row.name in (rows[0].name, REFERENCE)]


def _accepts(config, predictive: str) -> bool:
    if "predictive" not in type(config).PREDICTION_OPTIONS:
        return False
    try:
        type(config).with_prediction_options({**config.to_dict(), "prompt": "sample"}, {"predictive": predictive})
    except ValueError:
        return False
    return True


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def rank_corr(a: list[float], b: list[float]) -> float | None:
    """Spearman correlation (no tie correction); None below 3 values."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(torch.tensor(a)), _ranks(torch.tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run of a sampled method (blob, tfb, mcd, sgp)")
    p.add_argument("--dataset", default="arc-e")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None, help="benchmark data (default: $BAYESLORA_DATA)")
    p.add_argument("--prompts", type=int, default=8, help="questions used as prompts")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens decoded per request")
    p.add_argument("--rows", default=None, help="comma-separated rows to run besides the deterministic and "
                                                 f"{REFERENCE!r} rows (default: every row the run can draw)")
    p.add_argument("--out", default="docs/results/generation.md", help="Markdown report (JSON next to it)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except (ValueError, OSError) as exc:  # a bad run folder, dataset or option: a message, not a traceback
        raise SystemExit(f"error: {exc}") from None


def _run(args, argv: list[str] | None) -> int:

    from bayeslora.bench.results_md import environment
    from bayeslora.serve import InferenceService
    from bayeslora.serve.generation import DecodeParams, decode
    from bayeslora.serve.protocol import ChatMessage
    from bayeslora.tasks import load_task

    from bayeslora.methods import SampledConfig, get_method_class

    info = Path(args.run_dir) / "run.json"
    method = json.loads(info.read_text()).get("method") if info.is_file() else None  # else load_run explains
    if method is not None and not issubclass(get_method_class(method).config_cls, SampledConfig):
        raise SystemExit(f"{args.run_dir} is a {method!r} run; this benchmark compares ways of drawing posterior "
                         "samples: give a run of blob, tfb, mcd or sgp")
    service = InferenceService.load(args.run_dir)
    run = service.run
    saved = run.method.config
    examples = load_task(args.dataset, args.split, data_dir=args.data_dir, limit=args.prompts)
    prompts = [service.chat_prompt([ChatMessage(role="user", content=ex.prompt)]) for ex in examples]
    rows = select_rows(rows_for(saved), args.rows)
    base = {"prompt": "sample", "sample_chunk": 0}  # every row states all of its options
    if "predictive" in type(saved).PREDICTION_OPTIONS:
        base["predictive"] = "mc"
    configs = {row.name: type(saved).with_prediction_options(saved.to_dict(), {**base, **row.options})
               for row in rows}
    seconds: dict[str, list[float]] = {row.name: [] for row in rows}
    steps: dict[str, list[list]] = {row.name: [] for row in rows}

    def decode_one(row: Row, ids: list[int], seed: int) -> tuple[float, list]:
        run.method.config = configs[row.name]
        params = DecodeParams(max_tokens=args.max_tokens, temperature=0.0, n_samples=row.samples)
        t0 = time.perf_counter()
        out = list(decode(run.model, run.method, ids, params, torch.Generator().manual_seed(seed)))
        return time.perf_counter() - t0, out

    decode_one(rows[1], prompts[0][:8], 0)  # warm-up
    for i, ids in enumerate(prompts):
        for row in rows:
            dt, out = decode_one(row, ids, seed=i)
            seconds[row.name].append(dt)
            steps[row.name].append(out)
        print(f"prompt {i + 1}/{len(prompts)} ({len(ids)} tokens) done", file=sys.stderr, flush=True)
    run.method.config = saved

    det, ref = steps[rows[0].name], steps[REFERENCE]
    ref_epi = sum(s.epistemic for seq in ref for s in seq) / sum(len(seq) for seq in ref)
    results = []
    for row in rows:
        seqs = steps[row.name]
        n_tokens = sum(len(seq) for seq in seqs)
        epi = sum(s.epistemic for seq in seqs for s in seq) / n_tokens
        same_det = sum(common_prefix([s.token_id for s in a], [s.token_id for s in b]) for a, b in
                       zip(seqs, det, strict=True)) / n_tokens
        pairs_a, pairs_b = [], []
        for a, b in zip(seqs, ref, strict=True):
            n = common_prefix([s.token_id for s in a], [s.token_id for s in b])
            pairs_a += [s.epistemic for s in a[:n]]
            pairs_b += [s.epistemic for s in b[:n]]
        results.append({
            "row": row.name, "samples": row.samples, "options": row.options,
            "s_per_request": round(statistics.mean(seconds[row.name]), 3),
            "cost_vs_deterministic": round(statistics.median(
                a / b for a, b in zip(seconds[row.name], seconds[rows[0].name], strict=True)), 2),
            "seconds": [round(x, 3) for x in seconds[row.name]],
            "mean_epistemic": epi, "epistemic_vs_reference": round(epi / ref_epi, 3) if ref_epi > 0 else None,
            "epistemic_rank_corr": None if row.samples == 1 else rank_corr(pairs_a, pairs_b),
            "n_compared": len(pairs_a),
            "mean_entropy": sum(s.entropy for seq in seqs for s in seq) / n_tokens,
            "same_as_deterministic": round(same_det, 3)})
    info = {"run": args.run_dir, "method": run.method.name, "model": run.info.get("model"),
            "saved_options": {k: getattr(saved, k) for k in type(saved).PREDICTION_OPTIONS},
            "dataset": args.dataset, "split": args.split, "prompts": len(prompts),
            "prompt_tokens": [len(x) for x in prompts], "max_tokens": args.max_tokens, "env": environment(),
            "rows": results}
    write_report(Path(args.out), info, argv if argv is not None else sys.argv[1:])
    print(json.dumps(results, indent=2))
    return 0


def _fmt(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _corr_cell(row: dict) -> str:
    """The rank correlation with its token count, or a dash alone where there is none (the deterministic row)."""
    corr = row["epistemic_rank_corr"]
    return "–" if corr is None else f"{corr:.3f} ({row['n_compared']})"


def write_report(out: Path, r: dict, argv: list[str]) -> None:
    from bayeslora.io_utils import atomic_write_text

    env = r["env"]
    tokens = r["prompt_tokens"]
    lines = [
        "# Generation under posterior samples: cost and kept uncertainty", "",
        (f"Run `{r['run']}` (method `{r['method']}`, model `{r['model']}`, saved prediction options "
         f"{r['saved_options']}); {r['prompts']} prompts: the first questions of `{r['dataset']}` {r['split']} as one "
         f"chat turn each ({min(tokens)}-{max(tokens)} tokens); greedy decoding of {r['max_tokens']} tokens per "
         "request (stop tokens off), the rows taking turns on each prompt. Cost: median over the prompts of the "
         "decode time relative to the deterministic decode of the same prompt. Epistemic: mean per-token mutual information (nats) and its ratio to the "
         f"`{REFERENCE}` row; rank corr.: Spearman correlation of the per-token epistemic values with that row's, "
         "over the tokens where both had emitted the same text so far (n tokens); same tokens: share of the "
         "emitted tokens equal to the deterministic decode's (common prefix)."), "",
        "| row | s / request | cost vs deterministic | mean epistemic | vs MC S=10 | rank corr. (n) | mean entropy "
        "| same tokens as deterministic |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {x['row']} | {x['s_per_request']:.2f} | {x['cost_vs_deterministic']:.2f} | {x['mean_epistemic']:.5f} "
          f"| {_fmt(x['epistemic_vs_reference'], 3)} | {_corr_cell(x)} | "
          f"{x['mean_entropy']:.3f} | {x['same_as_deterministic']:.3f} |" for x in r["rows"]], "",
        "Command:", "", "```",
        "python bench/generation_bench.py " + " ".join(shlex.quote(a) for a in argv), "```", "",
        (f"Hardware: {env['cpu']}, {env['cores']} cores visible, torch threads {torch.get_num_threads()}; "
         f"GPU: {env['gpu']}."),
        f"Versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}.", "",
    ]
    atomic_write_text(out, "\n".join(lines))
    atomic_write_text(out.with_suffix(".json"), json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
