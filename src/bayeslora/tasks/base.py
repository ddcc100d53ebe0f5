"""Multiple-choice examples and the prompt templates shared by the tasks.

Every task turns its raw rows into :class:`MCExample`. An example carries both formulations:

* **letter** (the protocol of the BLoB and Laplace-LoRA papers): one prompt listing the question and the labelled
  choices, ending in ``Answer:``; the next-token logits restricted to the label tokens ``" A"``, ``" B"``, ... are
  the choice logits. Labels are always written ``A``..``E`` (ARC's numeric labels ``1``..``5`` are mapped by
  position), so one set of label tokens serves every task.
* **cloze** (the lm-evaluation-harness convention): one ``(context, continuation)`` pair per choice; a choice's
  score is the (length-normalized) log-likelihood of its continuation given its context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

LETTERS = "ABCDEFGHIJ"


class DatasetError(ValueError):
    """A dataset that cannot be found or parsed; the message names the file and line."""


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question.

    Attributes
    ----------
    id : str
        Unique id within its split.
    choices : tuple[str, ...]
        Choice texts, in order; ``label`` indexes into it.
    label : int
        Index of the correct choice.
    prompt : str
        Letter-format prompt ending in ``"Answer:"``.
    cloze : tuple[tuple[str, str], ...]
        One ``(context, continuation)`` pair per choice for the cloze format.
    """

    id: str
    choices: tuple[str, ...]
    label: int
    prompt: str
    cloze: tuple[tuple[str, str], ...]

    @property
    def n_choices(self) -> int:
        return len(self.choices)


def random_subset(examples: list, n: int | None, generator: torch.Generator | None = None) -> list:
    """``n`` examples drawn without replacement with ``generator`` (default: seed 0), kept in their original order;
    all of them when ``n`` is None or at least their number. A split's *first* questions are not a sample of it
    (ARC-E's first 64 validation questions are far harder than the split: docs/FINDINGS.md, finding 21)."""
    if n is None or n >= len(examples):
        return list(examples)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(examples), generator=generator)[:n].sort().values
    return [examples[i] for i in keep.tolist()]


def letter_prompt(question: str, choices: list[str] | tuple[str, ...], preamble: str = "") -> str:
    """``[preamble\\n]Question: {q}\\nChoices:\\nA) ..\\nB) ..\\nAnswer:``"""
    lines = [preamble] if preamble else []
    lines.append(f"Question: {question}")
    lines.append("Choices:")
    lines.extend(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    lines.append("Answer:")
    return "\n".join(lines)


def qa_example(id: str, question: str, choices: list[str], label: int, preamble: str = "") -> MCExample:
    """Question-answering template used by ARC, OBQA, user files and the built-in task.

    cloze: context ``[preamble\\n]Question: {q}\\nAnswer:``, continuation ``" {choice}"``.
    """
    head = f"{preamble}\n" if preamble else ""
    context = f"{head}Question: {question}\nAnswer:"
    return MCExample(
        id=id,
        choices=tuple(choices),
        label=label,
        prompt=letter_prompt(question, choices, preamble),
        cloze=tuple((context, f" {c}") for c in choices),
    )


def validate_choices(choices: list, label: int, where: str) -> None:
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise DatasetError(f"{where}: expected 2 to {len(LETTERS)} choices, but got {choices!r}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise DatasetError(f"{where}: every choice must be a non-empty string, but got {choices!r}")
    if not 0 <= label < len(choices):
        raise DatasetError(f"{where}: answer index {label} is outside the {len(choices)} choices")


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark, as spreadsheet programs write, is dropped); a file that is not
    UTF-8 is an error naming the file and line."""
    if path.is_dir():
        raise DatasetError(f"Dataset {path} is a folder; expected a .jsonl, .json or .csv file")
    if not path.is_file():
        raise DatasetError(f"Dataset file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{path}:{lineno}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as "
                           "UTF-8") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into ``(line_number, object)``; a bad line is an error naming file and line."""
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object, but got {type(obj).__name__} (data files "
                               "are JSON lines: one question object per line, also for .json)")
        rows.append((lineno, obj))
    return rows


def require(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise DatasetError(f"{where}: field {key!r} should be {kind.__name__}, but got {type(value).__name__}")
    return value
