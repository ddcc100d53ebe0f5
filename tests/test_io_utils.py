"""Atomic writes (bayeslora.io_utils): files and folders get the umask's modes, not tempfile's private ones."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bayeslora.io_utils import atomic_dir, atomic_write_text, check_writable_folder, json_text


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


def test_safetensors_written_into_a_folder_get_the_umask_modes(tmp_path, umask_022):
    """safetensors writes its files 0600: a run's adapter and posterior were unreadable to other users."""
    import torch
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "adapter").mkdir(mode=0o700)
        save_file({"a": torch.zeros(2)}, str(tmp / "adapter" / "w.safetensors"))
    assert stat.S_IMODE((tmp_path / "run" / "adapter" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "run" / "adapter").stat().st_mode) == 0o755


def test_a_folder_replaces_a_file_of_its_name(tmp_path):
    """A file where a checkpoint folder goes (hand-made) is replaced, twice in a row, and nothing is left."""
    (tmp_path / "checkpoint").write_text("not a folder")
    for _ in range(2):
        with atomic_dir(tmp_path / "checkpoint") as tmp:
            (tmp / "state.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (tmp_path / "checkpoint" / "state.json").is_file()


def test_check_writable_folder(tmp_path):
    check_writable_folder(tmp_path / "new" / "deeper")  # created later, under a writable folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_writable_folder(tmp_path / "file")
    with pytest.raises(ValueError, match="cannot write in /proc"):
        check_writable_folder(Path("/proc/bayeslora-out"))  # os.access says yes to root here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


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
