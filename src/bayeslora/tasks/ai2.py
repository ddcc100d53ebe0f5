"""ARC (Easy / Challenge) and OpenBookQA, in AI2's original release format (same schema for both).

Row: ``{"id": str, "question": {"stem": str, "choices": [{"text": str, "label": str}, ...]}, "answerKey": str}``.
Labels are ``A``-``E`` or ``1``-``5``; 3 to 5 choices. The answer key is mapped to the index of its label, and the
prompt always shows ``A``.. by position (see :mod:`bayeslora.tasks.base`).
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError, MCExample, qa_example, read_jsonl, require, validate_choices


def parse_ai2_row(obj: dict, where: str) -> MCExample:
    question = require(obj, "question", dict, where)
    stem = require(question, "stem", str, where)
    raw_choices = require(question, "choices", list, where)
    try:
        texts = [c["text"] for c in raw_choices]
        labels = [str(c["label"]) for c in raw_choices]
    except (TypeError, KeyError):
        raise DatasetError(f"{where}: each choice needs 'text' and 'label', but got {raw_choices!r}") from None
    key = str(require(obj, "answerKey", str, where))
    if key not in labels:
        raise DatasetError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    label = labels.index(key)
    validate_choices(texts, label, where)
    return qa_example(str(require(obj, "id", str, where)), stem, texts, label)


def load_ai2_file(path: Path) -> list[MCExample]:
    return [parse_ai2_row(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
