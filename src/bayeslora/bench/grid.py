"""The calibration grid: methods x datasets x seeds, each cell trained (or Bayesianized post hoc) and evaluated.

Resumable and crash-isolated: every cell writes ``cells/KEY.json`` atomically when it finishes (``status`` "ok" or
"error" with the message); ``results.jsonl`` is rewritten atomically from those files after each cell. A rerun with
the same ``--out`` skips the cells whose status is "ok", retries failed ones, and reuses finished training runs.

Layout of ``OUT/``::

    grid.json              resolved protocol (preset, model, command line); a rerun must match it
    results.jsonl          one row per cell: every metric per evaluation set, wall times, peak memory
    cells/KEY.json         the same row, one file per cell (the source of truth for resuming)
    cells/KEY/*.safetensors  per-example probabilities and uncertainties of each evaluation set (for the plots)
    runs/METHOD-DATASET-sSEED/  the run directories (post-hoc methods start from runs/mle-DATASET-sSEED)
"""

from __future__ import annotations

import json
import math
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..io_utils import atomic_write_bytes, atomic_write_text, json_text
from ..predictive import Predictive
from .environment import environment
from .ood import OOD_TASKS, OOD_TRAIN_TASK, ood_auroc
from .selective import selective_summary

DATASETS = ("arc-e", "arc-c", "obqa", "boolq", "wg-s", "wg-m")
CELLS_DIR = "cells"
RUNS_DIR = "runs"
RESULTS_FILE = "results.jsonl"
GRID_FILE = "grid.json"
MLE = "mle"


class GridError(ValueError):
    """An invalid grid request (unknown preset, method or dataset; an output folder of another protocol)."""


@dataclass(frozen=True)
class Preset:
    """A training/evaluation budget. ``None`` limits mean the whole split."""

    name: str
    description: str
    max_steps: int  # optimizer steps per trained cell
    batch_size: int  # questions per step
    lr: float
    warmup_ratio: float
    max_length: int  # tokens per row
    train_limit: int | None  # first N training questions
    eval_limit: int | None  # a fixed random subset of N questions per evaluation set (same for every cell)
    fit_limit: int | None  # training questions a post-hoc method fits on
    eval_batch_size: int = 8
    test_split: bool = True  # also evaluate on the test split where the task has one (validation always)
    n_samples: int | None = None  # posterior samples of sampling methods (None: each method's default)
    method_options: dict = field(default_factory=dict)  # per-method options {method: {key: value}}, applied last
    datasets: tuple[str, ...] = DATASETS
    seeds: tuple[int, ...] = (1, 2, 3)
    dtype: str = "auto"  # model dtype of every cell (auto: bfloat16 on CUDA, float32 on CPU)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Measured end to end on 2 idle cores with the real model (runs/small, 2026-11-23): all nine methods in 43 min
    # (`/usr/bin/time` of the whole command; cells from 91 s for temperature scaling to 652 s for Laplace), when TFB
    # ran the paper's anchor search on 32 anchors (its default then; the default val_nll + glm fit reads validation
    # and has no search options: docs/FINDINGS.md, finding 22). SmolLM2-135M is at chance on OBQA, so this is a
    # smoke test of the pipeline, not a calibration comparison (docs/FINDINGS.md): use cpu-fewshot / cpu-overfit.
    Preset("cpu-small", "CPU smoke protocol for SmolLM2-135M on 2 cores: OBQA only, seed 1, 20 steps of 8 "
           "questions, fixed 40-question subsets of OBQA validation and test and of the ARC-C / ARC-E test sets "
           "(OOD), 4 posterior samples for sampling methods (Laplace: 50 logit samples), post-hoc fits on 200 "
           "training questions (temperature scaling: the whole validation split)", max_steps=20,
           batch_size=8, lr=3e-4, warmup_ratio=0.1, max_length=256, train_limit=None, eval_limit=40, fit_limit=200,
           n_samples=4, datasets=("obqa",), seeds=(1,),
           method_options={"laplace": {"n_samples": 50, "n_val": 200}}),  # n_val: its table's (the default was 200)
    # Small-data protocol (the regime the project is about: few examples, an adapter that overfits). Probe on the
    # real model (2 idle cores): MLE on the first 32 ARC-E training questions, 40 steps of 4 at lr 1e-3, reaches 97%
    # training accuracy while validation confidence is 0.62 at 44% accuracy (ECE 23%). ~3 s per step. Measured: one
    # seed of all nine methods took 48 min (docs/results/calibration-cpu-fewshot.md, cost table).
    Preset("cpu-fewshot", "CPU small-data protocol for SmolLM2-135M on 2 cores: ARC-E, the first 32 training "
           "questions, 40 steps of 4 at lr 1e-3 (5 epochs), fixed 60-question subsets of ARC-E validation and test, "
           "post-hoc fits on 64 training questions (temperature scaling: the whole validation split), 4 posterior "
           "samples for sampling methods (Laplace: 50 logit samples), seeds 1-3", max_steps=40,
           batch_size=4, lr=1e-3, warmup_ratio=0.1, max_length=256, train_limit=32, eval_limit=60, fit_limit=64,
           n_samples=4, datasets=("arc-e",), seeds=(1, 2, 3),
           method_options={"laplace": {"n_samples": 50}}),
    # The same small-data protocol trained 4x longer (20 epochs of the 32 questions): the regime where an MLE adapter
    # has memorized its training set and is overconfident, which is what Bayesian LoRA is meant to fix (on
    # cpu-fewshot the MLE adapter is not overconfident on the test subset: docs/FINDINGS.md). One seed: ~8 min per
    # trained cell on 2 cores.
    Preset("cpu-overfit", "CPU overfitting protocol for SmolLM2-135M on 2 cores: cpu-fewshot (ARC-E, the first 32 "
           "training questions, lr 1e-3, fixed 60-question validation/test subsets, post-hoc fits on 64 training "
           "questions (temperature scaling: the whole validation split), 4 posterior samples) trained for 160 "
           "steps of 4 (20 epochs), seed 1", max_steps=160, batch_size=4,
           lr=1e-3, warmup_ratio=0.1, max_length=256, train_limit=32, eval_limit=60, fit_limit=64, n_samples=4,
           datasets=("arc-e",), seeds=(1,),
           method_options={"laplace": {"n_samples": 50}}),
    # One GPU lease (30 min on an H100, shared with the speed benchmarks): all of ARC-E's 2251 training questions,
    # 400 steps of 16 (2.8 epochs; on a GPU a SmolLM2 step costs the same at batch 8 and 128), lr 3e-4, the full
    # validation (570) and test (2376) sets, each method's own defaults (10 posterior samples; Laplace's curvature on
    # 100 training questions and its prior on 128 validation questions; TFB's sigma on validation questions). In
    # float32: SmolLM2 is launch-bound on a GPU, so bfloat16 saves no time there, and in bfloat16 the first lease's
    # letter-format grid went NaN and TFB's search found sigma = 0 (docs/FINDINGS.md, "On a GPU").
    Preset("gpu-arc-e", "One-GPU protocol for SmolLM2-135M: ARC-E, all 2251 training questions, 400 steps of 16 at "
           "lr 3e-4 (2.8 epochs), full validation and test sets, each method's default posterior samples and fit "
           "sizes, float32, seeds 1-3", max_steps=400, batch_size=16, lr=3e-4, warmup_ratio=0.06, max_length=256,
           train_limit=None, eval_limit=None, fit_limit=None, eval_batch_size=16, datasets=("arc-e",),
           seeds=(1, 2, 3), dtype="float32"),
    # The BLoB paper's protocol (reference scripts scripts/*/...-llama-all.sh): 5000 steps of batch 4, lr 1e-4,
    # warmup 6%, 300 tokens, LoRA r 8 / alpha 16 on q, v and the LM head, seeds 1-3, full evaluation sets.
    Preset("full", "The papers' protocol for a GPU: 5000 steps of 4 questions, lr 1e-4, full evaluation sets, "
           "all six datasets, seeds 1-3", max_steps=5000, batch_size=4, lr=1e-4, warmup_ratio=0.06, max_length=300,
           train_limit=None, eval_limit=None, fit_limit=None, eval_batch_size=16),
)}


@dataclass
class GridConfig:
    out: str
    preset: Preset
    methods: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    ood_files: list[str] = field(default_factory=list)
    model: str = "smollm2-135m"
    data_dir: str | None = None
    command: str = ""
    ood_train: str = OOD_TRAIN_TASK  # cells of this dataset are also evaluated out of distribution
    ood_tasks: list[str] = field(default_factory=lambda: list(OOD_TASKS))

    def protocol(self) -> dict:
        """What a rerun in the same folder must keep: results of another budget or model are not comparable (the
        preset's wording is not part of it)."""
        return {"preset": asdict(self.preset) | {"description": None, "datasets": None, "seeds": None},
                "model": self.model,
                "ood_train": self.ood_train}


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}__{_safe(self.dataset)}__s{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.method}-{_safe(self.dataset)}-s{self.seed}"


def _safe(name: str) -> str:
    stem = Path(name).stem if name.endswith((".jsonl", ".json", ".csv")) else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


def make_config(out: str, preset: str | Preset = "cpu-small", methods: list[str] | None = None,
                datasets: list[str] | None = None, seeds: list[int] | None = None, ood_files: list[str] | None = None,
                model: str = "smollm2-135m", data_dir: str | None = None, command: str = "",
                ood_train: str = OOD_TRAIN_TASK, ood_tasks: list[str] | None = None) -> GridConfig:
    """Validate the request and fill defaults: methods = every registered method (MLE first, post-hoc last)."""
    from ..methods import METHODS

    if not isinstance(preset, Preset) and preset not in PRESETS:
        raise GridError(f"Unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    chosen = preset if isinstance(preset, Preset) else PRESETS[preset]
    methods = list(methods) if methods else default_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GridError(f"Unknown method(s) {unknown}; registered: {sorted(METHODS)}")
    datasets = list(datasets) if datasets else list(chosen.datasets)
    from ..tasks import TASKS, is_user_file

    files = [d for d in datasets if is_user_file(d)]
    if files:
        raise GridError(f"A user file is one split (it would be trained and evaluated on the same questions): "
                        f"{files}; pass it with --ood, or give registered task names as --datasets")
    bad = [d for d in datasets if d not in TASKS]
    if bad:
        raise GridError(f"Unknown dataset(s) {bad}; expected names from `bayeslora tasks`")
    seeds = list(seeds) if seeds else list(chosen.seeds)
    if any(not isinstance(s, int) or s < 0 for s in seeds):
        raise GridError(f"Expected non-negative integer seeds, but got {seeds}")
    for path in ood_files or []:
        if not Path(path).is_file():
            raise GridError(f"OOD file {path} does not exist")
    if ood_files and ood_train not in datasets:
        raise GridError(f"--ood files are evaluated against the cells trained on {ood_train!r}, which is not among "
                        f"the datasets {datasets}")
    return GridConfig(out=str(out), preset=chosen, methods=_ordered(methods), datasets=datasets, seeds=seeds,
                      ood_files=list(ood_files or []), model=model, data_dir=data_dir, command=command,
                      ood_train=ood_train, ood_tasks=list(OOD_TASKS if ood_tasks is None else ood_tasks))


def default_methods() -> list[str]:
    from ..methods import METHODS

    return _ordered(list(METHODS))


def _ordered(methods: list[str]) -> list[str]:
    """MLE first (post-hoc methods start from its runs), then trained methods, then post-hoc ones."""
    from ..methods import METHODS

    unique = list(dict.fromkeys(methods))
    return sorted(unique, key=lambda m: (m != MLE, bool(getattr(METHODS[m], "posthoc", False)), m))


def cells(config: GridConfig) -> list[Cell]:
    return [Cell(m, d, s) for m in config.methods for d in config.datasets for s in config.seeds]


# -- the runner ---------------------------------------------------------------------------------------------------
def run_grid(config: GridConfig, log: Callable[[str], None] = print, subprocesses: bool = False) -> list[dict]:
    """Run every unfinished cell; returns all rows (finished earlier or now) in grid order.

    With ``subprocesses`` each cell runs in a fresh Python process: its peak memory is its own (not the high-water
    mark of the cells before it) and a hard crash (killed for memory, a segfault) fails only that cell.
    """
    out = Path(config.out)
    _check_protocol(out, config)
    todo = cells(config)
    for i, cell in enumerate(todo, 1):
        done = read_cell(out, cell)
        if done is not None and done.get("status") == "ok":
            missing = missing_eval_sets(config, cell, done)
            if not missing:
                log(f"[{i}/{len(todo)}] {cell.key}: done earlier, skipped")
                continue
            # a rerun with new --ood files: evaluate the finished run on them, keep the rest of the row
            log(f"[{i}/{len(todo)}] {cell.key}: done earlier, adding {', '.join(missing)}")
            extra = (run_cell_subprocess(config, cell, only=missing) if subprocesses
                     else run_cell_isolated(config, cell, only=missing))
            if extra["status"] == "ok":
                write_cell(out, cell, done | {"metrics": {**done["metrics"], **extra["metrics"]}})
                write_results(out)
                log(f"[{i}/{len(todo)}] {cell.key}: added in {extra['wall_time_s']:.1f} s")
            else:  # the finished row stays as it was; the next rerun tries again
                log(f"[{i}/{len(todo)}] {cell.key}: adding {', '.join(missing)} FAILED ({extra['error']})")
            continue
        log(f"[{i}/{len(todo)}] {cell.key}: running")
        row = run_cell_subprocess(config, cell) if subprocesses else run_cell_isolated(config, cell)
        write_cell(out, cell, row)
        write_results(out)
        status = "ok" if row["status"] == "ok" else f"FAILED ({row['error']})"
        log(f"[{i}/{len(todo)}] {cell.key}: {status} in {row['wall_time_s']:.1f} s")
    return collect_rows(out, config)


def _check_protocol(out: Path, config: GridConfig) -> None:
    path = out / GRID_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GridError(f"{path} is not valid JSON ({exc.msg}); remove it or choose another --out") from None
        protocol = saved.get("protocol")
        if isinstance(protocol, dict) and isinstance(protocol.get("preset"), dict):
            protocol["preset"]["description"] = None  # folders written before the wording left the protocol
            protocol["preset"].setdefault("dtype", "auto")  # folders written before presets named a dtype
        if protocol != config.protocol():
            raise GridError(f"{out} holds a grid with another preset or model ({saved.get('protocol', {})}); "
                            f"choose another --out")
    commands = grid_commands(out)
    if config.command and (not commands or commands[-1] != config.command):
        commands.append(config.command)  # a grid filled by several runs (seeds, methods) keeps all their commands
    record = {"protocol": config.protocol(), "config": asdict(config), "commands": commands,
              "python": sys.version.split()[0], "torch": torch.__version__}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def git_commit(package: Path | None = None) -> str:
    """Short commit of the bayeslora source that runs (``unknown`` outside a git checkout), with ``+dirty`` when
    the package's files (or those under ``package``) differ from that commit: a cell run on uncommitted code must
    not claim a commit."""
    package = Path(package) if package is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=package)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], capture_output=True, timeout=10,
                              cwd=package)
        return commit + "+dirty" if diff.returncode == 1 else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def grid_commands(out: Path) -> list[str]:
    """The command lines that filled the grid in ``OUT``, oldest first (empty when unknown; folders written before
    the history was kept have only their last one)."""
    try:
        saved = json.loads((Path(out) / GRID_FILE).read_text())
        commands = saved.get("commands") or [saved["config"].get("command", "")]
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return []
    return [c for c in commands if isinstance(c, str) and c]


def grid_command(out: Path) -> str:
    """Those command lines, one per line (empty when unknown)."""
    return "\n".join(grid_commands(out))


def missing_eval_sets(config: GridConfig, cell: Cell, row: dict) -> list[str]:
    """The OOD sets of this grid that a finished cell's row has no metrics for (``--ood`` files added on a rerun)."""
    if cell.dataset != config.ood_train:
        return []
    have = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
    names = [f"ood:{name}" for name in config.ood_tasks] + [f"ood:{_safe(path)}" for path in config.ood_files]
    return [name for name in names if name not in have]


def run_cell_isolated(config: GridConfig, cell: Cell, only: list[str] | None = None) -> dict:
    """Run one cell (``only``: evaluate its finished run on these sets and nothing else); any exception becomes a
    row with status "error" (the traceback goes to ``cells/KEY.log``)."""
    t0 = time.perf_counter()
    row: dict = {"method": cell.method, "dataset": cell.dataset, "seed": cell.seed}
    try:
        row.update(run_cell(config, cell, only=only))
        row["status"], row["error"] = "ok", None
    except Exception as exc:  # noqa: BLE001 - crash isolation: record and go on with the next cell
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {exc}"
        log_path = Path(config.out) / CELLS_DIR / f"{cell.key}.log"
        atomic_write_text(log_path, traceback.format_exc())
    row["wall_time_s"] = round(time.perf_counter() - t0, 3)
    row["commit"] = git_commit()
    row["env"] = environment()  # the machine that ran this cell, for the report's hardware line
    # ru_maxrss is the process's high-water mark (KiB on Linux): with cells run in one process it is the peak
    # over this cell and those before it.
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


#: how a cell's process is started (the module's ``main`` runs one cell); a list so tests can replace it
CELL_COMMAND = [sys.executable, "-m", "bayeslora.bench.grid"]


def run_cell_subprocess(config: GridConfig, cell: Cell, only: list[str] | None = None) -> dict:
    """Run one cell in a child process (see :func:`run_grid`); a child that dies becomes an error row."""
    out = Path(config.out)
    request = out / CELLS_DIR / f"{cell.key}.request.json"
    atomic_write_text(request, json.dumps({"config": asdict(config), "cell": asdict(cell), "only": only}))
    result_path = out / CELLS_DIR / f"{cell.key}.child.json"
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = _run_child([*CELL_COMMAND, str(request), str(result_path)])
    request.unlink(missing_ok=True)
    if proc.returncode == 0 and result_path.is_file():
        row = json.loads(result_path.read_text())
        result_path.unlink()
        return row
    atomic_write_text(out / CELLS_DIR / f"{cell.key}.log", proc.stdout[-20000:] + proc.stderr[-20000:])
    return {"method": cell.method, "dataset": cell.dataset, "seed": cell.seed, "status": "error",
            "error": f"the cell's process exited with code {proc.returncode} (output in {cell.key}.log)",
            "wall_time_s": round(time.perf_counter() - t0, 3)}


def _run_child(command: list[str]) -> subprocess.CompletedProcess:
    """Run a cell's process; a grid stopped by a signal (SIGTERM, SIGINT) stops its cell too. Without this a killed
    grid left its running cell behind: on the GPU lease of session 18 the orphaned ensemble cells kept the GPU's
    memory and the next cells failed on it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def config_from_dict(values: dict) -> GridConfig:
    preset = {k: tuple(v) if isinstance(v, list) else v for k, v in values["preset"].items()}
    return GridConfig(**{**values, "preset": Preset(**preset)})


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: ``python -m bayeslora.bench.grid REQUEST.json RESULT.json`` runs one cell."""
    request_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    request = json.loads(Path(request_path).read_text())
    row = run_cell_isolated(config_from_dict(request["config"]), Cell(**request["cell"]), only=request.get("only"))
    atomic_write_text(Path(result_path), json_text(row))
    return 0


def run_cell(config: GridConfig, cell: Cell, only: list[str] | None = None) -> dict:
    """Train (or Bayesianize) and evaluate one cell; returns its timings and metrics. With ``only``, the cell's
    finished run is evaluated on those sets alone (and its in-distribution reference set for the OOD AUROC)."""
    from ..methods import get_method_class
    from ..runs import load_run

    out = Path(config.out)
    if only is not None:
        run_dir = out / RUNS_DIR / cell.run_name
        if not _run_done(run_dir):
            raise GridError(f"{run_dir} is not a finished run: remove {CELLS_DIR}/{cell.key}.json to redo the cell")
        run = load_run(run_dir, model_spec=config.model)
        return {"metrics": evaluate_cell(config, cell, run, out / CELLS_DIR / cell.key, only=only)}
    timings: dict = {}
    if getattr(get_method_class(cell.method), "posthoc", False):
        source = ensure_trained(config, Cell(MLE, cell.dataset, cell.seed), timings, prefix="mle_")
        run_dir = ensure_posthoc(config, cell, source, timings)
    else:
        run_dir = ensure_trained(config, cell, timings)
    run = load_run(run_dir, model_spec=config.model)
    evals = evaluate_cell(config, cell, run, out / CELLS_DIR / cell.key)
    return {**timings, "run_dir": str(run_dir), "n_samples": run.method.config.n_samples, "metrics": evals}


def method_options(config: GridConfig, method: str) -> dict:
    """The preset's sample count for methods that sample by default (deterministic methods keep theirs, 0), then
    the preset's own options for ``method``."""
    from ..methods import get_method_class

    n = config.preset.n_samples
    options = {} if n is None or get_method_class(method).config_cls().n_samples == 0 else {"n_samples": n}
    return options | dict(config.preset.method_options.get(method, {}))


def _run_done(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "done"
    except (OSError, json.JSONDecodeError):
        return False


def ensure_trained(config: GridConfig, cell: Cell, timings: dict, prefix: str = "") -> Path:
    """Train the cell's run unless it is finished; an interrupted one resumes from its checkpoint."""
    from ..config import TrainConfig
    from ..train import train

    run_dir = Path(config.out) / RUNS_DIR / cell.run_name
    if not _run_done(run_dir):
        p = config.preset
        train_config = TrainConfig(model=config.model, dataset=cell.dataset, method=cell.method,
                                   method_options=method_options(config, cell.method), data_dir=config.data_dir,
                                   lr=p.lr, batch_size=p.batch_size, max_steps=p.max_steps,
                                   warmup_ratio=p.warmup_ratio, max_length=p.max_length, train_limit=p.train_limit,
                                   save_every=max(50, p.max_steps // 10), seed=cell.seed, dtype=p.dtype)
        train(train_config, run_dir, resume=run_dir.exists(), progress=False)
    info = json.loads((run_dir / "run.json").read_text())
    timings[f"{prefix}train_time_s"] = info.get("train_time_s")
    timings[f"{prefix}steps"] = info.get("steps")
    return run_dir


def ensure_posthoc(config: GridConfig, cell: Cell, source: Path, timings: dict) -> Path:
    """Apply a post-hoc method to the MLE run ``source`` (``bayeslora.posthoc.bayesianize``)."""
    from ..methods import get_method_class

    try:
        from ..posthoc import bayesianize
    except ImportError as exc:
        raise GridError(f"Post-hoc method {cell.method!r} needs bayeslora.posthoc, which is unavailable ({exc})") \
            from None
    run_dir = Path(config.out) / RUNS_DIR / cell.run_name
    if not _run_done(run_dir):
        t0 = time.perf_counter()
        # split=None: each post-hoc method fits on its own default split (e.g. temperature on validation). The
        # fit limit is for training questions: a split's first questions are no sample of it, and temperature
        # scaling fits on all of validation (cells before 2026-11-24 took its first fit_limit; FINDINGS 21).
        # The fit's forwards and backwards run at the preset's evaluation batch: on a GPU, where SmolLM2 is
        # launch-bound, bayesianize's default of 8 would pay per question what a batch of 16 pays per batch.
        on_train = getattr(get_method_class(cell.method), "fit_split", "train") == "train"
        bayesianize(source, cell.method, run_dir, dataset=cell.dataset, split=None,
                    options=method_options(config, cell.method), data_dir=config.data_dir,
                    model=config.model, limit=config.preset.fit_limit if on_train else None, seed=cell.seed,
                    batch_size=config.preset.eval_batch_size)
        timings["fit_time_s"] = round(time.perf_counter() - t0, 3)  # the whole call, model loading included
        fit_only = _fit_only_seconds(run_dir)
        if fit_only is not None:
            timings["fit_only_s"] = fit_only
        epoch = fit_epoch_seconds(timings, run_dir, config.preset.batch_size)
        if epoch is not None:
            timings["fit_epoch_s"] = epoch
    return run_dir


def _fit_only_seconds(run_dir: Path) -> float | None:
    """The fit's own time (``run.json``'s ``fit.time_s``: no model loading), the part comparable with an MLE
    epoch's training loop."""
    try:
        return float(json.loads((run_dir / "run.json").read_text())["fit"]["time_s"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def fit_epoch_seconds(timings: dict, run_dir: Path, batch_size: int) -> float | None:
    """Wall time of one MLE training epoch over the post-hoc fit set: the MLE cell's measured time per step times
    the steps an epoch of the fit questions takes (the unit of the post-hoc cost goal)."""
    try:
        n = int(json.loads((run_dir / "run.json").read_text())["fit"]["n_examples"])
        per_step = float(timings["mle_train_time_s"]) / int(timings["mle_steps"])
    except (OSError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return round(per_step * math.ceil(n / batch_size), 3)


# -- evaluation ---------------------------------------------------------------------------------------------------
def subsample(examples: list, limit: int | None, seed: int = 0) -> list:
    """A fixed random subset of ``limit`` examples (in their original order); the same for every method and seed,
    so that cells are compared on the same questions (``bayeslora eval --sample N`` draws the same one)."""
    from ..tasks import random_subset

    return random_subset(examples, limit, torch.Generator().manual_seed(seed))


def eval_sets(config: GridConfig, dataset: str) -> dict[str, list]:
    """In-distribution evaluation sets of ``dataset``: validation, and test where the task has one."""
    from ..tasks import DatasetError, load_task

    sets = {"validation": load_task(dataset, "validation", config.data_dir)}
    if config.preset.test_split:
        try:
            sets["test"] = load_task(dataset, "test", config.data_dir)
        except DatasetError:
            pass  # boolq and winogrande have no labelled test split here
    return {name: subsample(examples, config.preset.eval_limit) for name, examples in sets.items()}


def ood_sets(config: GridConfig) -> dict[str, list]:
    """The OOD sets of the protocol (test splits of ARC-C/ARC-E) and the user's ``--ood`` files."""
    from ..tasks import load_task

    sets = {f"ood:{name}": load_task(name, "test", config.data_dir) for name in config.ood_tasks}
    for path in config.ood_files:
        sets[f"ood:{_safe(path)}"] = load_task(path, "test", config.data_dir)
    return {name: subsample(examples, config.preset.eval_limit) for name, examples in sets.items()}


def evaluate_cell(config: GridConfig, cell: Cell, run, pred_dir: Path,
                  only: list[str] | None = None) -> dict[str, dict]:
    """Metrics per evaluation set: in-distribution splits, and for OBQA cells the OOD protocol. With ``only``, the
    metrics of those sets (the in-distribution reference of their AUROC is evaluated again, not returned)."""
    from ..evaluate import evaluate_examples

    sets = eval_sets(config, cell.dataset)
    if cell.dataset == config.ood_train:
        sets.update(ood_sets(config))
    if only is not None:
        reference = "test" if "test" in sets else "validation"
        sets = {name: examples for name, examples in sets.items() if name in only or name == reference}
    results: dict[str, dict] = {}
    preds: dict[str, Predictive] = {}
    for name, examples in sets.items():
        metrics, pred = evaluate_examples(run, examples, batch_size=config.preset.eval_batch_size, seed=cell.seed)
        labels = torch.tensor([ex.label for ex in examples])
        metrics.update(selective_summary(pred.probs, labels))
        save_predictions(pred_dir / f"{name.replace(':', '_')}.safetensors", pred, labels)
        results[name], preds[name] = metrics, pred
    in_name = "test" if "test" in preds else "validation"
    for name in [n for n in preds if n.startswith("ood:")]:
        results[name].update(ood_auroc(preds[in_name], preds[name]))
        results[name]["ood_reference"] = in_name
    return results if only is None else {name: m for name, m in results.items() if name in only}


def save_predictions(path: Path, pred: Predictive, labels: torch.Tensor) -> None:
    """Per-example probabilities ``(N, C)``, labels and uncertainties, for the report's plots (safetensors)."""
    tensors = {"probs": pred.probs.float().contiguous(), "labels": labels.long().contiguous(),
               "epistemic": pred.epistemic.float().contiguous(), "total": pred.total.float().contiguous()}
    atomic_write_bytes(path, save(tensors))


def load_predictions(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- rows ---------------------------------------------------------------------------------------------------------
def read_cell(out: Path, cell: Cell) -> dict | None:
    path = Path(out) / CELLS_DIR / f"{cell.key}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record is redone


def write_cell(out: Path, cell: Cell, row: dict) -> None:
    atomic_write_text(Path(out) / CELLS_DIR / f"{cell.key}.json", json_text(row, indent=2) + "\n")


def collect_rows(out: Path, config: GridConfig | None = None) -> list[dict]:
    """Rows of the grid's cells in grid order; without a config, every cell record in the folder."""
    out = Path(out)
    if config is not None:
        rows = [read_cell(out, c) for c in cells(config)]
        return [r for r in rows if r is not None]
    rows = []
    for path in sorted((out / CELLS_DIR).glob("*.json")):
        if path.name.endswith((".request.json", ".child.json")):
            continue  # a cell process's hand-over files (left behind when a grid is killed mid-cell)
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return rows


def write_results(out: Path) -> Path:
    """``results.jsonl`` from the cell records (all of the folder's cells, so earlier grids' cells stay)."""
    rows = collect_rows(out)
    from ..methods import METHODS

    known = _ordered([r["method"] for r in rows if r["method"] in METHODS])
    rank = {m: i for i, m in enumerate(known)}  # MLE, trained, post-hoc: whichever run wrote the cells
    rows.sort(key=lambda r: (rank.get(r["method"], len(rank)), r["method"], r["dataset"], r["seed"]))
    path = Path(out) / RESULTS_FILE
    atomic_write_text(path, "".join(json_text(r) + "\n" for r in rows))
    return path


def read_results(out: Path) -> list[dict]:
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise GridError(f"{out} has no {RESULTS_FILE}: run `bayeslora bench calibration --out {out}` first")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GridError(f"{path}:{i} is not valid JSON ({exc.msg})") from None
            problem = row_problem(row)
            if problem:
                raise GridError(f"{path}:{i} is not a grid cell's row: {problem}")
            rows.append(row)
    return rows


#: a row's fields the reports read, and their types (``metrics`` only in rows with status "ok")
ROW_FIELDS = {"method": (str, "a string"), "dataset": (str, "a string"), "seed": (int, "an integer"),
              "status": (str, "a string")}


def row_problem(row) -> str | None:
    """What makes ``row`` unusable for a report (``None`` when it is usable)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key, (kind, name) in ROW_FIELDS.items():
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            return f"{key!r} should be {name}, got {row.get(key)!r}"
    if row["status"] == "ok":
        metrics = row.get("metrics")
        if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
            return "'metrics' should map each evaluation set to its metrics"
    return None


__all__ = ["DATASETS", "PRESETS", "Cell", "GridConfig", "GridError", "Preset", "cells", "make_config", "run_grid"]


if __name__ == "__main__":
    sys.exit(main())
