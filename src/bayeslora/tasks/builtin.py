"""The built-in task, generated offline by this code: no data files needed (the demo runs on it).

``arith`` (in-distribution): "What is a + b?" with a, b drawn from 0..99 and four numeric choices: the sum and three
distractors at small offsets (+-1, +-2, +-10) from it, in random order.
``arith-ood`` (out-of-distribution companion): the same question form for subtraction and multiplication of
numbers in the same range, with distractors built the same way. A model fine-tuned on ``arith`` has never seen
these operations answered, which is what the out-of-distribution evaluation probes.

The splits are disjoint: each task's operand pairs (unordered, so ``3 + 5`` and ``5 + 3`` count as one) are shuffled
once and cut into train, validation and test, 1,200 questions each. So no validation or test question, nor its
mirror image, is a training question, and in-distribution accuracy measures generalization, not memory (until
session 21 each split drew its pairs independently, and about 37% of validation and test questions were training
questions). Deterministic: the pair order has a fixed seed per task; each split's operand order and distractors
have their own (train 0, validation 1, test 2; the OOD task 100+).
"""

from __future__ import annotations

import random

from .base import MCExample, qa_example

BUILTIN_SIZE = 1200
OPERAND_RANGE = 100  # operands 0..99
_SPLITS = ("train", "validation", "test")
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
_OFFSETS = (-10, -2, -1, 1, 2, 10)
_OPS = {"arith": ("+",), "arith-ood": ("-", "*")}


def _pairs(name: str) -> list[tuple[str, int, int]]:
    """Every ``(op, a, b)`` of the task with ``a <= b``, in a fixed shuffled order (split ``k`` takes its k-th block)."""
    pairs = [(op, a, b) for op in _OPS[name] for a in range(OPERAND_RANGE) for b in range(a, OPERAND_RANGE)]
    random.Random(f"bayeslora-{name}-pairs").shuffle(pairs)
    return pairs


def _example(rng: random.Random, index: int, name: str, op: str, a: int, b: int) -> MCExample:
    if op == "-":
        a, b = b, a  # the larger first: no negative answers
    elif rng.random() < 0.5:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    distractors = rng.sample([value + d for d in _OFFSETS if value + d >= 0], 3)
    choices = [value, *distractors]
    rng.shuffle(choices)
    return qa_example(f"{name}-{index}", f"What is {a} {op} {b}?", [str(c) for c in choices], choices.index(value))


def generate(name: str, split: str, n: int = BUILTIN_SIZE) -> list[MCExample]:
    """Generate split ``split`` of the built-in task ``name`` (``arith`` or ``arith-ood``): ``n`` questions whose
    operand pairs no other split of the task has."""
    pairs = _pairs(name)
    if not 1 <= n <= len(pairs) // len(_SPLITS):
        raise ValueError(f"Expected 1 to {len(pairs) // len(_SPLITS)} questions per split of {name!r}, but got {n}")
    start = _SPLITS.index(split) * n
    rng = random.Random(_SPLIT_SEEDS[split] + (100 if name == "arith-ood" else 0))
    return [_example(rng, i, name, *pair) for i, pair in enumerate(pairs[start:start + n])]
