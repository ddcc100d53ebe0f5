"""BoolQ in the SuperGLUE format: ``{"question", "passage": "<title> -- <text>", "idx": int, "label": bool}``.

Only the 3270-row validation file exists here, so ``train`` and ``validation`` are a deterministic split of it:
a permutation of the rows with ``random.Random(0)``, the first 2270 rows train and the last 1000 validation.
There is no test split. Every result on BoolQ reports this split.

Templates (choices are ``no``/``yes``, label ``True`` -> ``yes``):
letter ``Passage: {passage}\\nQuestion: {question}?\\nChoices:\\nA) no\\nB) yes\\nAnswer:``;
cloze context ``Passage: {passage}\\nQuestion: {question}?\\nAnswer:``, continuations ``" no"`` / ``" yes"``.
"""

from __future__ import annotations

import random
from pathlib import Path

from .base import DatasetError, MCExample, qa_example, read_jsonl, require

BOOLQ_TRAIN_ROWS = 2270
BOOLQ_SPLIT_SEED = 0


def parse_boolq_row(obj: dict, where: str, label_key: str = "label") -> MCExample:
    question = require(obj, "question", str, where)
    passage = require(obj, "passage", str, where)
    answer = require(obj, label_key, bool, where)
    idx = obj.get("idx", where.rsplit(":", 1)[-1])
    return qa_example(f"boolq-{idx}", f"{question}?", ["no", "yes"], int(answer), preamble=f"Passage: {passage}")


def load_boolq(path: Path, split: str) -> list[MCExample]:
    rows = [parse_boolq_row(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    order = list(range(len(rows)))
    random.Random(BOOLQ_SPLIT_SEED).shuffle(order)
    if split == "train":
        keep = order[:BOOLQ_TRAIN_ROWS]
    elif split == "validation":
        keep = order[BOOLQ_TRAIN_ROWS:]
    else:
        raise DatasetError(f"BoolQ has no {split!r} split here (only train/validation, both from its validation file)")
    return [rows[i] for i in sorted(keep)]
