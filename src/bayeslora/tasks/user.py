"""User datasets.

* JSONL, one object per line: ``{"question": str, "choices": [str, ...], "answer": int index or choice label}``
  with an optional ``"id"``. A label answer is ``"A"``.. (by position) or the exact text of a choice.
* CSV without header in the MMLU layout: ``question,A,B,C,D,answer`` (any number >= 2 of choice columns; the
  answer is a letter ``A``.. or a 0-based index; a number is always an index, even where a choice reads the same).
* In Python (``Run.predict``, ``evaluate_examples``): the JSONL objects as dicts (:func:`as_examples`).

Files are UTF-8 (a byte-order mark is dropped).

Every malformed row is an error naming the file, the line and the problem; nothing is skipped.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .base import (LETTERS, DatasetError, MCExample, qa_example, read_jsonl, read_text, require,
                   validate_choices)


def _answer_index(answer, choices: list[str], where: str, numbers_are_indices: bool = False) -> int:
    """The label of ``answer``: an int index; a letter ``A``.. by position; the exact text of a choice; a string of
    digits as an index (``numbers_are_indices``: before the choice texts, as in CSV files, where every cell is a
    string)."""
    if isinstance(answer, bool):
        raise DatasetError(f"{where}: answer should be an index or a choice label, but got {answer!r}")
    digits = isinstance(answer, str) and answer.strip().isdigit()
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)] and len(answer.strip()) == 1:
        index = LETTERS.index(answer.strip().upper())
    elif digits and numbers_are_indices:
        index = int(answer.strip())
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif digits:
        index = int(answer.strip())
    else:
        raise DatasetError(f"{where}: answer {answer!r} is neither an index, a letter A.. nor one of the choices")
    validate_choices(choices, index, where)
    return index


def example_from_dict(obj: dict, where: str, default_id: str, require_answer: bool = True) -> MCExample:
    """One question from ``{"question": str, "choices": [str, ...], "answer": ..., "id": ...}`` (a JSONL line, or a
    dict given in Python); without ``require_answer`` a missing answer is label 0."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a dict with 'question' and 'choices', but got {type(obj).__name__}")
    question = require(obj, "question", str, where)
    choices = require(obj, "choices", list, where)
    validate_choices(choices, 0, where)
    if "answer" in obj:
        label = _answer_index(obj["answer"], choices, where)
    elif require_answer:
        raise DatasetError(f"{where}: missing field 'answer'")
    else:
        label = 0
    return qa_example(str(obj.get("id", default_id)), question, choices, label)


def as_examples(items, require_answer: bool = True, what: str = "examples") -> list[MCExample]:
    """``items`` (a list of :class:`MCExample` or dicts as in a JSONL file) as examples; a bad item is an error
    naming it. ``require_answer``: dicts must give an ``answer`` (evaluation), else it defaults to 0
    (prediction)."""
    if isinstance(items, (dict, str, bytes, MCExample)) or not hasattr(items, "__iter__"):
        raise DatasetError(f"Expected a list of questions as {what}, but got one {type(items).__name__}")
    return [item if isinstance(item, MCExample) else
            example_from_dict(item, f"Question {i}", str(i), require_answer) for i, item in enumerate(items)]


def load_user_jsonl(path: Path) -> list[MCExample]:
    examples = [example_from_dict(obj, f"{path}:{lineno}", f"{path.stem}-{lineno}")
                for lineno, obj in read_jsonl(path)]
    return _non_empty(examples, path)


def load_user_csv(path: Path) -> list[MCExample]:
    examples = []
    for lineno, row in enumerate(csv.reader(io.StringIO(read_text(path), newline="")), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) < 4:
            raise DatasetError(f"{where}: expected question,choice,choice,...,answer but got {len(row)} columns")
        question, choices, answer = row[0], row[1:-1], row[-1]
        validate_choices(choices, 0, where)
        label = _answer_index(answer, choices, where, numbers_are_indices=True)
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
