"""Hardware and library versions, printed next to every measured number."""

from __future__ import annotations

import os
import platform
import sys
import subprocess


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment() -> dict[str, str]:
    """Hardware and versions, as written next to every measurement (and recorded by each grid cell)."""
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu_model(), "cores": str(cores), "gpu": gpu, **versions}



def environment_lines() -> list[str]:
    import peft
    import torch
    import transformers

    threads = torch.get_num_threads()
    return [f"Hardware: {cpu_model()}, {os.cpu_count()} cores visible, torch threads {threads}; "
            f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}.",
            f"Versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}."]
