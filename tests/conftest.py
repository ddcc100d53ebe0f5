"""Shared fixtures: tiny seeded models offline; the benchmark data and the real model for integration tests.

Under CI (``CI=true``) a missing data directory or default model is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str):
    if ON_CI:
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    env = os.environ.get("BAYESLORA_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        _missing(f"benchmark data not found at {path} (set BAYESLORA_DATA)")
    return path


@pytest.fixture(scope="session")
def real_model():
    from bayeslora.models import ModelLoadError, load_model

    try:
        return load_model("smollm2-135m")
    except ModelLoadError as exc:
        _missing(str(exc))


@pytest.fixture
def tiny():
    from bayeslora.models import load_model

    torch.manual_seed(0)
    return load_model("tiny-random-llama")


@pytest.fixture
def arith_examples():
    from bayeslora.tasks import load_task

    return load_task("arith", "validation", limit=6)


@pytest.fixture
def cli():
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from bayeslora.cli import main

    def run(*args, capsys=None):
        return main([str(a) for a in args])
    return run
