"""Benchmark: does the confidence that ``bayeslora serve`` returns with a free-form answer flag the wrong answers?

    python bench/generation_selective.py RUN_DIR --questions 200 --out docs/results/generation-selective.md

Each question of a multiple-choice split is asked *without* its choices, as the run's cloze context
(``Question: ...\\nAnswer:``, the text the adapter was fine-tuned on), through the server's own completion path
(``InferenceService.completion``: greedy, stop at the first newline, ``--max-tokens`` at most). The answer is judged
against the choices by token F1 (lower-cased, punctuation and articles dropped, as in SQuAD's answer matching): it
is correct when the gold choice has the highest F1, strictly above every other choice, and at least
``--min-f1``. Each row decodes every question with other prediction options (``bayeslora serve --option`` and
``samples``); for a deterministic row the confidence comes from the point model alone.

Per row: free-form accuracy; for each sequence-level uncertainty in the served ``confidence`` object (one minus
``score``, the geometric-mean token probability; ``mean_entropy``; ``max_entropy``; ``mean_aleatoric``;
``mean_epistemic``), the AUROC of ranking wrong answers above right ones (0.5: no better than chance), the area
under the risk-coverage curve (AURC, lower is better) and the accuracy on the half of the questions it is most
confident about; and the decoding time relative to the deterministic row (median over questions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import string
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ARTICLES = {"a", "an", "the"}
#: sequence-level uncertainties: name -> uncertainty (higher: less trust) from a served ``Confidence``
UNCERTAINTIES = {
    "1 - score": lambda c: 1.0 - c["score"],
    "mean entropy": lambda c: c["mean_entropy"],
    "max entropy": lambda c: c["max_entropy"],
    "mean aleatoric": lambda c: c["mean_aleatoric"],
    "mean epistemic": lambda c: c["mean_epistemic"],
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    samples: int
    options: dict


ROWS = {
    "det": Row("deterministic (S=1)", 1, {}),
    "mc10": Row("MC S=10", 10, {"predictive": "mc"}),
    "mc4": Row("MC S=4", 4, {"predictive": "mc"}),
    "anti4": Row("antithetic S=4", 4, {"predictive": "antithetic"}),
    "anti2": Row("antithetic S=2", 2, {"predictive": "antithetic"}),
    "mean10": Row("MC S=10, prompt=mean", 10, {"predictive": "mc", "prompt": "mean"}),
    "head10": Row("head S=10", 10, {"predictive": "head"}),
    "glm4": Row("linearized S=4", 4, {"predictive": "glm"}),  # TFB's default: the adapter's text, linearized samples
}


def normalize(text: str) -> list[str]:
    """Lower-cased words without punctuation and articles."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return [w for w in text.split() if w not in ARTICLES]


def token_f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def judge(answer: str, choices: list[str], label: int, min_f1: float) -> tuple[bool, int, float]:
    """``(correct, best-matching choice, its F1)``: correct iff the gold choice alone has the highest F1, and it is
    at least ``min_f1``."""
    words = normalize(answer)
    f1 = [token_f1(words, normalize(c)) for c in choices]
    best = max(range(len(choices)), key=lambda i: f1[i])
    unique = sum(1 for x in f1 if x == f1[best]) == 1
    return best == label and unique and f1[best] >= min_f1, best, f1[best]


def selective_metrics(uncertainty: list[float], correct: list[bool]) -> dict:
    from bayeslora.bench.selective import accuracy_at_coverage, aurc
    from bayeslora.metrics import auroc

    u = torch.tensor(uncertainty, dtype=torch.float64)
    ok = torch.tensor(correct, dtype=torch.bool)
    return {"auroc_errors": auroc(u, ~ok), "aurc": aurc(-u, ok), "acc_at_50": accuracy_at_coverage(-u, ok, 0.5)}


def _options(row: Row, config) -> dict:
    """The row's prediction options for this method: ``predictive=mc`` is implied where a method has only MC."""
    names = type(config).PREDICTION_OPTIONS
    return {k: v for k, v in row.options.items() if not (k == "predictive" and v == "mc" and k not in names)}


def _rows(names: str, config) -> list[Row]:
    rows = []
    for name in names.split(","):
        if name not in ROWS:
            raise SystemExit(f"Unknown row {name!r}: choose among {sorted(ROWS)}")
        row = ROWS[name]
        if row.samples > 1 and not _accepts(config, _options(row, config)):
            print(f"skipping row {row.name!r}: this method has no such predictive", file=sys.stderr)
            continue
        rows.append(row)
    if not rows or rows[0].samples != 1:
        raise SystemExit("The first row must be `det` (the time reference)")
    return rows


def _accepts(config, options: dict) -> bool:
    names = type(config).PREDICTION_OPTIONS
    if any(k not in names for k in options):
        return False
    try:
        type(config).with_prediction_options(config.to_dict(), options)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run (any method; sampled methods give the epistemic rows)")
    p.add_argument("--dataset", default="arc-e")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None, help="benchmark data (default: $BAYESLORA_DATA)")
    p.add_argument("--questions", type=int, default=100, help="the first N questions of the split")
    p.add_argument("--max-tokens", type=int, default=20, help="at most this many tokens per answer")
    p.add_argument("--min-f1", type=float, default=0.5, help="token F1 with the gold choice needed to count")
    p.add_argument("--rows", default="det,anti4,mc10", help=f"comma-separated, among {sorted(ROWS)}; det first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/generation-selective.md", help="Markdown report (JSON next to it)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except (ValueError, OSError) as exc:  # a bad run folder, dataset or option: a message, not a traceback
        raise SystemExit(f"error: {exc}") from None


def _run(args, argv: list[str] | None) -> int:

    from bayeslora.bench.results_md import environment
    from bayeslora.serve import InferenceService
    from bayeslora.serve.protocol import CompletionRequest
    from bayeslora.tasks import load_task

    examples = load_task(args.dataset, args.split, data_dir=args.data_dir, limit=args.questions)
    for ex in examples:
        if len({context for context, _ in ex.cloze}) != 1:
            raise SystemExit(f"{args.dataset}: question {ex.id!r} has a different context per choice (e.g. "
                             "WinoGrande): there is no one question to ask; use arc-e, arc-c, obqa or boolq")
    service = InferenceService.load(args.run_dir)
    run = service.run
    saved = run.method.config
    rows = _rows(args.rows, saved)
    base = {k: v for k, v in (("prompt", "sample"), ("sample_chunk", 0)) if k in type(saved).PREDICTION_OPTIONS}
    configs = {row.name: type(saved).with_prediction_options(saved.to_dict(), {**base, **_options(row, saved)})
               if row.samples > 1 else saved for row in rows}
    records: dict[str, list[dict]] = {row.name: [] for row in rows}

    def ask(row: Row, prompt: str, seed: int) -> tuple[float, dict]:
        run.method.config = configs[row.name]
        req = CompletionRequest(model=service.model_id, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0,
                                stop=["\n"], seed=seed, samples=row.samples)
        t0 = time.perf_counter()
        choice = service.completion(req).choices[0]
        return time.perf_counter() - t0, {"text": choice.text, "confidence": choice.confidence.model_dump()}

    ask(rows[-1], examples[0].cloze[0][0], 0)  # warm-up
    for i, ex in enumerate(examples):
        prompt = ex.cloze[0][0]
        for row in rows:  # rows take turns on each question: load from other jobs hits them alike
            dt, rec = ask(row, prompt, seed=args.seed + i)
            correct, best, f1 = judge(rec["text"], list(ex.choices), ex.label, args.min_f1)
            records[row.name].append({"id": ex.id, "seconds": dt, "correct": correct, "best_choice": best,
                                      "f1": f1, **rec})
        if (i + 1) % 10 == 0 or i + 1 == len(examples):
            print(f"question {i + 1}/{len(examples)} done", file=sys.stderr, flush=True)
    run.method.config = saved

    det = records[rows[0].name]
    results = []
    for row in rows:
        recs = records[row.name]
        correct = [r["correct"] for r in recs]
        results.append({
            "row": row.name, "samples": row.samples, "options": row.options,
            "accuracy": sum(correct) / len(correct), "mean_tokens": statistics.mean(r["confidence"]["n_tokens"]
                                                                                    for r in recs),
            "cost_vs_deterministic": round(statistics.median(r["seconds"] / d["seconds"]
                                                             for r, d in zip(recs, det, strict=True)), 2),
            "same_answer_as_deterministic": sum(r["text"] == d["text"] for r, d in zip(recs, det, strict=True))
            / len(recs),
            "uncertainty": {name: selective_metrics([fn(r["confidence"]) for r in recs], correct)
                            for name, fn in UNCERTAINTIES.items()}})
    info = {"run": args.run_dir, "method": run.method.name, "model": run.info.get("model"),
            "dataset": args.dataset, "split": args.split, "questions": len(examples), "max_tokens": args.max_tokens,
            "min_f1": args.min_f1, "env": environment(), "rows": results, "answers": records}
    write_report(Path(args.out), info, argv if argv is not None else sys.argv[1:])
    print(json.dumps(results, indent=2))
    return 0


def _f(x: float, digits: int = 3) -> str:
    return "–" if x != x else f"{x:.{digits}f}"  # NaN (one class empty)


def write_report(out: Path, r: dict, argv: list[str]) -> None:
    from bayeslora.io_utils import atomic_write_text

    env = r["env"]
    lines = [
        "# Free-form answers: does the served confidence flag the wrong ones?", "",
        (f"Run `{r['run']}` (method `{r['method']}`, model `{r['model']}`): the first {r['questions']} questions of "
         f"`{r['dataset']}` {r['split']}, each asked without its choices as the cloze context; greedy, stop at a "
         f"newline, at most {r['max_tokens']} tokens, through `InferenceService.completion` (what `POST "
         "/v1/completions` runs). An answer is correct when the gold choice alone has the highest token F1 with it "
         f"and that F1 is at least {r['min_f1']}. AUROC: wrong answers ranked above right ones by the uncertainty "
         "(0.5 = chance); AURC: area under the risk-coverage curve (lower is better); acc@50%: accuracy on the half "
         "answered with the least uncertainty; cost: median time per question relative to the deterministic row."),
        "",
        "| row | accuracy | tokens | cost | same answer as det. | " + " | ".join(
            f"AUROC {n}" for n in UNCERTAINTIES) + " | AURC (best) | acc@50% (best) |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(UNCERTAINTIES) + "---:|---:|",
    ]
    for x in r["rows"]:
        u = x["uncertainty"]
        best = min(u, key=lambda n: u[n]["aurc"] if u[n]["aurc"] == u[n]["aurc"] else float("inf"))
        lines.append(
            f"| {x['row']} | {100 * x['accuracy']:.1f} | {x['mean_tokens']:.1f} | {x['cost_vs_deterministic']:.2f} "
            f"| {100 * x['same_answer_as_deterministic']:.0f}% | "
            + " | ".join(_f(u[n]["auroc_errors"]) for n in UNCERTAINTIES)
            + f" | {_f(u[best]['aurc'])} ({best}) | {_f(100 * u[best]['acc_at_50'], 1)} ({best}) |")
    lines += ["", "Command:", "", "```",
              "python bench/generation_selective.py " + " ".join(shlex.quote(a) for a in argv), "```", "",
              (f"Hardware: {env['cpu']}, {env['cores']} cores visible, torch threads {torch.get_num_threads()}; "
               f"GPU: {env['gpu']}."),
              f"Versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
              f"peft {env['peft']}.", ""]
    atomic_write_text(out, "\n".join(lines))
    atomic_write_text(out.with_suffix(".json"), json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
