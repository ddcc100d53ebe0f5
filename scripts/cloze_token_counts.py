"""Tokens per question in the cloze format with a shared context: the context (run once per question) and the
continuations of all choices (what a sampled answer-only pass repeats S times; docs/FINDINGS.md, finding 12)::

    python scripts/cloze_token_counts.py --dataset arc-e --split validation --limit 200
"""

from __future__ import annotations

import argparse
import statistics

from bayeslora.models import load_model
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="arc-e")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    scorer = make_scorer("cloze", load_model(args.model).tokenizer, max_length=256)
    context, continuations = [], []
    for example in load_task(args.dataset, args.split, limit=args.limit):
        enc = scorer.encode([example])
        context.append(int(enc.prefix_mask.sum()))
        continuations.append(int(enc.cont_mask.sum()))
    print(f"{len(context)} questions: context {statistics.mean(context):.1f} tokens, continuations of all choices "
          f"{statistics.mean(continuations):.1f} tokens (mean per question)")


if __name__ == "__main__":
    main()
