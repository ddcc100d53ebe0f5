"""Hugging Face hub loaders for the benchmark names (used with ``--source hub``; needs network or a warm cache).

The rows of the hub's versions differ from the original release files; each is converted here to the release
schema and parsed by the same code, so both sources give identical examples. Requires the optional ``datasets``
package (``pip install datasets``).
"""

from __future__ import annotations

from .ai2 import parse_ai2_row
from .base import DatasetError, MCExample
from .boolq import parse_boolq_row
from .winogrande import parse_winogrande_row

# task name -> (hub repo, config, {our split: hub split})
HUB_DATASETS = {
    "arc-e": ("allenai/ai2_arc", "ARC-Easy", {"train": "train", "validation": "validation", "test": "test"}),
    "arc-c": ("allenai/ai2_arc", "ARC-Challenge", {"train": "train", "validation": "validation", "test": "test"}),
    "obqa": ("allenai/openbookqa", "main", {"train": "train", "validation": "validation", "test": "test"}),
    "boolq": ("google/boolq", None, {"train": "train", "validation": "validation"}),
    "wg-s": ("allenai/winogrande", "winogrande_s", {"train": "train", "validation": "validation"}),
    "wg-m": ("allenai/winogrande", "winogrande_m", {"train": "train", "validation": "validation"}),
}


def hub_row_to_release(task: str, row: dict) -> dict:
    """Convert one hub row to the original release schema of ``task``."""
    if task in ("arc-e", "arc-c", "obqa"):
        choices = row["choices"]
        stem = row["question"] if task != "obqa" else row["question_stem"]
        return {
            "id": row["id"],
            "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                   for t, lab in zip(choices["text"], choices["label"], strict=True)]},
            "answerKey": row["answerKey"],
        }
    if task == "boolq":
        return {"question": row["question"], "passage": row["passage"], "label": bool(row["answer"])}
    if task in ("wg-s", "wg-m"):
        return {key: row[key] for key in ("sentence", "option1", "option2", "answer")}
    raise DatasetError(f"No hub loader for task {task!r}")


_PARSERS = {"arc-e": parse_ai2_row, "arc-c": parse_ai2_row, "obqa": parse_ai2_row,
            "boolq": parse_boolq_row, "wg-s": parse_winogrande_row, "wg-m": parse_winogrande_row}


def parse_hub_rows(task: str, rows, source: str = "hub") -> list[MCExample]:
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}:{i + 1}"
        release = hub_row_to_release(task, row)
        ex = _PARSERS[task](release, where)
        if task == "boolq":
            ex = ex.__class__(**{**ex.__dict__, "id": f"boolq-{i}"})
        elif task in ("wg-s", "wg-m"):
            ex = ex.__class__(**{**ex.__dict__, "id": f"{task}-{i}"})
        examples.append(ex)
    return examples


def load_hub(task: str, split: str) -> list[MCExample]:
    if task not in HUB_DATASETS:
        raise DatasetError(f"No hub loader for task {task!r}; known: {sorted(HUB_DATASETS)}")
    repo, config, splits = HUB_DATASETS[task]
    if split not in splits:
        raise DatasetError(f"{task} has no {split!r} split on the hub (has {sorted(splits)})")
    try:
        import datasets
    except ImportError:
        raise DatasetError("Loading from the hub needs the `datasets` package: pip install datasets") from None
    rows = datasets.load_dataset(repo, config, split=splits[split])
    return parse_hub_rows(task, rows, source=f"{repo}/{config}/{splits[split]}")
