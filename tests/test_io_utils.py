"""Atomic writes (bayeslora.io_utils): files and folders get the umask's modes, not tempfile's private ones."""

from __future__ import annotations

import json
import os
import stat

import pytest

from bayeslora.io_utils import atomic_dir, atomic_write_text, json_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_are_readable_by_others(tmp_path, umask_022):
    atomic_write_text(tmp_path / "run.json", "{}")
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_text("w")
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    atomic_write_text(tmp_path / "run.json", '{"a": 1}')  # a replaced file keeps the mode
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644


def test_failed_folder_write_keeps_the_old_one(tmp_path):
    atomic_write_text(tmp_path / "adapter" / "weights", "old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_text("new")
        raise RuntimeError("the fit failed")
    assert (tmp_path / "adapter" / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_json_text_is_strict():
    text = json_text({"auroc": float("nan"), "ece": float("inf"), "n": 3, "rows": [1.5, float("-inf")]})
    assert json.loads(text) == {"auroc": None, "ece": None, "n": 3, "rows": [1.5, None]}
