"""User datasets.

* JSONL, one object per line: ``{"question": str, "choices": [str, ...], "answer": int index or choice label}``
  with an optional ``"id"``. A label answer is ``"A"``.. (by position) or the exact text of a choice.
* CSV without header in the MMLU layout: ``question,A,B,C,D,answer`` (any number >= 2 of choice columns; the
  answer is a letter ``A``.. or a 0-based index).

Every malformed row is an error naming the file, the line and the problem; nothing is skipped.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .base import LETTERS, DatasetError, MCExample, qa_example, read_jsonl, require, validate_choices


def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        raise DatasetError(f"{where}: answer should be an index or a choice label, but got {answer!r}")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)] and len(answer.strip()) == 1:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise DatasetError(f"{where}: answer {answer!r} is neither an index, a letter A.. nor one of the choices")
    validate_choices(choices, index, where)
    return index


def load_user_jsonl(path: Path) -> list[MCExample]:
    examples = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        question = require(obj, "question", str, where)
        choices = require(obj, "choices", list, where)
        if "answer" not in obj:
            raise DatasetError(f"{where}: missing field 'answer'")
        validate_choices(choices, 0, where)
        label = _answer_index(obj["answer"], choices, where)
        examples.append(qa_example(str(obj.get("id", f"{path.stem}-{lineno}")), question, choices, label))
    return _non_empty(examples, path)


def load_user_csv(path: Path) -> list[MCExample]:
    if not path.is_file():
        raise DatasetError(f"Dataset file not found: {path}")
    examples = []
    with path.open(encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) < 4:
                raise DatasetError(f"{where}: expected question,choice,choice,...,answer but got {len(row)} columns")
            question, choices, answer = row[0], row[1:-1], row[-1]
            validate_choices(choices, 0, where)
            label = _answer_index(answer, choices, where)
            examples.append(qa_example(f"{path.stem}-{lineno}", question, choices, label))
    return _non_empty(examples, path)


def _non_empty(examples: list[MCExample], path: Path) -> list[MCExample]:
    if not examples:
        raise DatasetError(f"{path}: no examples found")
    return examples


def load_user_file(path: str | Path) -> list[MCExample]:
    path = Path(path)
    if path.suffix == ".csv":
        return load_user_csv(path)
    if path.suffix in (".jsonl", ".json"):
        return load_user_jsonl(path)
    raise DatasetError(f"Expected a .jsonl or .csv dataset file, but got {path}")
