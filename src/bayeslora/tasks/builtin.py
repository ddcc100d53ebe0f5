"""The built-in task, generated offline by this code: no data files needed (the demo runs on it).

``arith`` (in-distribution): "What is a + b?" with a, b drawn from 0..50 and four numeric choices: the sum and three
distractors at small offsets (+-1, +-2, +-10) from it, in random order.
``arith-ood`` (out-of-distribution companion): the same question form for subtraction and multiplication of
numbers in the same range, with distractors built the same way. A model fine-tuned on ``arith`` has never seen
these operations answered, which is what the out-of-distribution evaluation probes.

Both are deterministic in their seed: 1,200 questions per split (train seed 0, validation seed 1, test seed 2;
the OOD task uses seeds 100+).
"""

from __future__ import annotations

import random

from .base import MCExample, qa_example

BUILTIN_SIZE = 1200
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
_OFFSETS = (-10, -2, -1, 1, 2, 10)


def _question(rng: random.Random, ops: tuple[str, ...]) -> tuple[str, int]:
    op = rng.choice(ops)
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if op == "-":
        a, b = max(a, b), min(a, b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", value


def _example(rng: random.Random, index: int, name: str, ops: tuple[str, ...]) -> MCExample:
    question, value = _question(rng, ops)
    distractors = rng.sample([value + d for d in _OFFSETS if value + d >= 0], 3)
    choices = [value, *distractors]
    rng.shuffle(choices)
    return qa_example(f"{name}-{index}", question, [str(c) for c in choices], choices.index(value))


def generate(name: str, split: str, n: int = BUILTIN_SIZE) -> list[MCExample]:
    """Generate split ``split`` of the built-in task ``name`` (``arith`` or ``arith-ood``)."""
    ops = {"arith": ("+",), "arith-ood": ("-", "*")}[name]
    seed = _SPLIT_SEEDS[split] + (100 if name == "arith-ood" else 0)
    rng = random.Random(seed)
    return [_example(rng, i, name, ops) for i in range(n)]
