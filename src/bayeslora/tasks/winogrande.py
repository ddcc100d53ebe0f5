"""WinoGrande v1.1: ``{"qID", "sentence" (one "_" blank), "option1", "option2", "answer": "1"|"2"}``.

The answer field is cross-checked against the ``*-labels.lst`` file next to the data when it exists.

Templates: letter ``Sentence: {sentence}\\nQuestion: Which option fills the blank (_)?\\nChoices:\\nA) {option1}\\n
B) {option2}\\nAnswer:``; cloze (the "partial evaluation" of lm-evaluation-harness): context = the sentence up to the
blank with the option filled in, continuation = the rest of the sentence, so both choices score the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetError, MCExample, letter_prompt, read_jsonl, require


def parse_winogrande_row(obj: dict, where: str) -> MCExample:
    sentence = require(obj, "sentence", str, where)
    options = [require(obj, "option1", str, where), require(obj, "option2", str, where)]
    answer = str(require(obj, "answer", (str, int), where))  # type: ignore[arg-type]
    if answer not in ("1", "2"):
        raise DatasetError(f"{where}: answer should be '1' or '2', but got {answer!r}")
    if sentence.count("_") != 1:
        raise DatasetError(f"{where}: sentence should contain exactly one '_' blank, but got {sentence!r}")
    before, after = sentence.split("_")
    prompt = letter_prompt("Which option fills the blank (_)?", options, preamble=f"Sentence: {sentence}")
    if not after.strip():
        raise DatasetError(f"{where}: nothing follows the blank, so the cloze format has no continuation to score")
    cloze = tuple((before + opt, " " + after.strip()) for opt in options)
    return MCExample(id=str(obj.get("qID", where)), choices=tuple(options), label=int(answer) - 1,
                     prompt=prompt, cloze=cloze)


def load_winogrande(path: Path) -> list[MCExample]:
    examples = [parse_winogrande_row(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    labels_file = path.with_name(path.stem + "-labels.lst")
    if labels_file.is_file():
        labels = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
        if len(labels) != len(examples):
            raise DatasetError(f"{labels_file}: {len(labels)} labels for {len(examples)} rows in {path}")
        for i, (ex, lab) in enumerate(zip(examples, labels, strict=True), start=1):
            if str(ex.label + 1) != lab:
                raise DatasetError(f"{labels_file}:{i}: label {lab!r} disagrees with the answer in {path}")
    return examples
