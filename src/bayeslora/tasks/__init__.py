"""Multiple-choice tasks: the registry of named datasets, user files and the built-in task.

``load_task(name, split, data_dir=None, source="local")`` returns a list of :class:`MCExample`. ``name`` is a
registered task (see :data:`TASKS`) or a path to a user ``.jsonl``/``.csv`` file. Local benchmark files are read
from ``data_dir``, else ``$BAYESLORA_DATA``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ai2 import load_ai2_file
from .base import DatasetError, MCExample, random_subset
from .boolq import load_boolq
from .builtin import generate
from .hub import load_hub
from .user import load_user_file
from .winogrande import load_winogrande

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    loader: Callable[[Path | None, str], list[MCExample]]  # (data_dir, split) -> examples
    needs_data: bool = True


def _files(subdir: str, names: dict[str, str], parser):
    def load(data_dir: Path | None, split: str) -> list[MCExample]:
        if split not in names:
            raise DatasetError(f"This task has no {split!r} split (has {sorted(names)})")
        return parser(_data_dir(data_dir) / subdir / names[split])
    return load


_AI2_SPLITS = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> None:
    if spec.name in TASKS:
        raise ValueError(f"Task {spec.name!r} is already registered")
    TASKS[spec.name] = spec


for _spec in (
    TaskSpec("arc-e", "ARC-Easy (AI2, 2018), 3-5 choices", _files("arc_easy", _AI2_SPLITS, load_ai2_file)),
    TaskSpec("arc-c", "ARC-Challenge (AI2, 2018), 3-5 choices", _files("arc_challenge", _AI2_SPLITS, load_ai2_file)),
    TaskSpec("obqa", "OpenBookQA main (AI2, 2018), 4 choices", _files("openbookqa", _AI2_SPLITS, load_ai2_file)),
    TaskSpec("boolq", "BoolQ yes/no; train/validation split of its validation file",
             lambda d, s: load_boolq(_data_dir(d) / "boolq" / "validation.jsonl", s)),
    TaskSpec("wg-s", "WinoGrande v1.1, train_s (640) / dev", _files(
        "winogrande", {"train": "train_s.jsonl", "validation": "dev.jsonl"}, load_winogrande)),
    TaskSpec("wg-m", "WinoGrande v1.1, train_m (2558) / dev", _files(
        "winogrande", {"train": "train_m.jsonl", "validation": "dev.jsonl"}, load_winogrande)),
    TaskSpec("arith", "built-in: addition with 4 numeric choices (generated offline)",
             lambda d, s: generate("arith", s), needs_data=False),
    TaskSpec("arith-ood", "built-in OOD companion of arith: subtraction and multiplication",
             lambda d, s: generate("arith-ood", s), needs_data=False),
):
    register_task(_spec)


def default_data_dir() -> Path | None:
    env = os.environ.get("BAYESLORA_DATA")
    return Path(env) if env else None


def _data_dir(data_dir: Path | None) -> Path:
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        raise DatasetError("No data directory: pass --data-dir or set BAYESLORA_DATA to the benchmark data folder")
    if not Path(data_dir).is_dir():
        raise DatasetError(f"Data directory {data_dir} does not exist")
    return Path(data_dir)


def is_user_file(name: str | os.PathLike) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return isinstance(name, str) and (name.endswith((".jsonl", ".json", ".csv")) or os.sep in name)


def load_task(name: str | os.PathLike, split: str = "train", data_dir: str | Path | None = None,
              source: str = "local", limit: int | None = None) -> list[MCExample]:
    """Examples of split ``split`` of task ``name`` (registered name or user file path); ``limit``: the first N."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DatasetError(f"Expected `limit` to be a positive int (the first N questions), but got {limit!r}")
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if split not in SPLITS:
        raise DatasetError(f"Expected `split` to be one of {SPLITS}, but got {split!r}")
    if source not in ("local", "hub"):
        raise DatasetError(f"Expected `source` to be 'local' or 'hub', but got {source!r}")
    if name in TASKS:
        if source == "hub" and TASKS[name].needs_data:
            examples = load_hub(name, split)
        else:
            examples = TASKS[name].loader(Path(data_dir) if data_dir else None, split)
    elif is_user_file(name):
        examples = load_user_file(name)  # a user file is one split: the same rows whatever `split` says
    else:
        raise DatasetError(f"Unknown dataset {name!r}: expected one of {sorted(TASKS)} or a .jsonl/.csv file")
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DatasetError(f"Dataset {name!r} split {split!r} is empty")
    return examples


__all__ = ["TASKS", "DatasetError", "MCExample", "TaskSpec", "load_task", "random_subset", "register_task"]
