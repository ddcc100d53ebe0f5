"""Atomic file and directory writes (a reader sees the old content or the new, never half of it), and strict
JSON text (no NaN or Infinity, which strict JSON readers reject)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umasked(mode: int) -> int:
    """``mode`` as ``open``/``mkdir`` would create it under the process's umask (``tempfile`` creates files 0600
    and folders 0700, which would leave a run unreadable to anyone else)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umasked(0o666))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` in one rename.

    On error the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, _umasked(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _umask_modes(tmp)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        _remove(old)


def _umask_modes(folder: Path) -> None:
    """Give what was written into ``folder`` the modes ``open``/``mkdir`` would (safetensors and tempfile write
    0600 files)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), _umasked(0o777))
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, _umasked(0o666))


def _remove(path: Path) -> None:
    """Remove ``path`` whatever it is (a folder, a file, a link); nothing when it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_writable_folder(out: Path, flag: str = "--out") -> None:
    """Before any long work: ``out`` must be a folder (or not exist yet) in which files can be created. Tried for
    real in the nearest existing folder: ``os.access`` says yes to root even where nothing can be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; expected a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".bayeslora-write-check-"))
    except OSError as exc:
        raise ValueError(f"{flag} {out}: cannot write in {parent} ({exc.strerror or exc})") from None


def json_safe(value):
    """JSON-safe copy: NaN/inf become null (strict JSON readers reject them), paths become strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def json_text(value, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``, refusing anything non-finite left (``allow_nan=False``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
