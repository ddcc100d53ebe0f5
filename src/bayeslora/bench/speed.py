"""``bayeslora bench speed``: what uncertainty costs, measured side by side on one model.

1. Training step time and peak memory per method relative to MLE, on the same batch. Each method runs in its own
   subprocess so that peak memory is its own: on CPU, the growth of the process's peak resident set (``VmHWM``,
   reset to the current RSS just before the first step) up to after the last one (model loading excluded); on
   CUDA, ``torch.cuda.max_memory_allocated`` over the steps. One warm-up step is excluded from the timings.
2. Predictive time of a BLoB model on one batch: the deterministic forward (posterior mean), S = 1, 4, 10 samples
   as S sequential forwards vs ONE batched forward (and, for the largest S, batched forwards of 2 and 5 samples:
   ``--option sample_chunk=2|5``), the cheap head predictive (trunk once + S head samples) and
   one antithetic pair (eps, -eps) of full samples in one batched forward (``--option predictive=antithetic``),
   and the mean-prompt predictive (``--option prompt=mean``: the prompt once at the posterior mean, the samples on
   the scored positions only) with one antithetic pair, S antithetic and S independent samples.
   Median of ``repeats`` timed runs after one warm-up run. Then the peak memory of the deterministic forward and of
   S = max one batched forward, chunks of 5 and 2, and S sequential forwards, each in its own subprocess.
3. Cloze scoring of one batch with each question's shared context run once (prefix pass + continuations on its KV
   cache, the default) vs every (question, choice) row in full: forward and forward + backward of the MLE model.
4. Post-hoc fit cost (part ``posthoc``, not in the default parts: minutes on a CPU): an MLE adapter trained for
   exactly one epoch over the first ``fit_questions`` training questions (its training-loop time is the unit), then
   each post-hoc method fitted to it on the same questions with its defaults, or the options of an entry
   ``NAME:KEY=VALUE`` (``bayeslora bayesianize``; Laplace also tunes its prior on validation questions,
   temperature scaling fits on validation), each in its own subprocess: fit time (model loading excluded) / the epoch, and the growth of the subprocess's peak memory over
   the whole fit (model loading included, unlike part 1).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io_utils import atomic_write_text, json_text
from .environment import environment_lines
from .grid import git_commit


PARTS = ("train", "predictive", "scoring", "posthoc")
DEFAULT_PARTS = ("train", "predictive", "scoring")


@dataclass
class SpeedConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "base model spec"})
    dataset: str = field(default="arc-e", metadata={"help": "task whose first questions form the batch"})
    methods: list[str] = field(default_factory=lambda: ["mle", "map", "mcd", "ens", "blob"])
    batch_size: int = field(default=8, metadata={"help": "questions per batch (training and prediction)"})
    steps: int = field(default=3, metadata={"help": "timed training steps per method (after one warm-up)"})
    rounds: int = field(default=1, metadata={"help": "training part: subprocesses per method, the methods taking "
                                                     "turns; each method's ratio to MLE is read round by round"})
    repeats: int = field(default=2, metadata={"help": "timed predictive runs per setting (after one warm-up)"})
    samples: list[int] = field(default_factory=lambda: [1, 4, 10])
    parts: list[str] = field(default_factory=lambda: list(DEFAULT_PARTS))
    data_dir: str | None = None
    posthoc_methods: list[str] = field(default_factory=lambda: ["laplace", "tfb", "temperature"])
    fit_questions: int = field(default=64, metadata={"help": "questions of the MLE epoch and the post-hoc fits"})
    format: str = field(default="auto", metadata={"help": "letter | cloze | auto (cloze for small models)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype (auto: bfloat16 on CUDA, float32 on CPU)"})
    keep_mle: str | None = field(default=None, metadata={"help": "posthoc part: keep the MLE epoch's run here "
                                                                 "(a usable adapter; default: discarded)"})

    def __post_init__(self):
        for name in ("batch_size", "steps", "rounds", "repeats", "fit_questions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {getattr(self, name)!r}")
        if not self.samples or any(s < 1 for s in self.samples):
            raise ValueError(f"Expected `samples` to be positive ints, but got {self.samples!r}")
        if not self.methods:
            raise ValueError("Expected at least one method")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"Expected parts among {list(PARTS)}, but got {self.parts!r}")
        if self.format not in ("auto", "letter", "cloze"):
            raise ValueError(f"Expected `format` in ['auto', 'letter', 'cloze'], but got {self.format!r}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(config: SpeedConfig, split: str, tokenizer, scorer):
    from ..tasks import load_task

    examples = load_task(config.dataset, split, config.data_dir, limit=config.batch_size)
    return scorer.encode(examples)


def _setup(config: SpeedConfig, method_name: str):
    from ..methods import AdapterConfig, build_method
    from ..models import load_model, parse_dtype
    from ..scoring import make_scorer
    from ..config import resolve_format

    torch.manual_seed(0)
    loaded = load_model(config.model, dtype=parse_dtype(config.dtype))
    method = build_method(method_name)
    model = method.prepare(loaded.model, AdapterConfig())
    scorer = make_scorer(resolve_format(config.format, config.model, loaded.model), loaded.tokenizer, max_length=256)
    return method, model, scorer


def _rss_peak_bytes(reset: bool = False) -> int:
    """This process's peak resident set: ``VmHWM`` of ``/proc/self/status`` (reset to the current RSS first when
    ``reset``; Linux). Not ``getrusage``'s ``ru_maxrss``: a child started by a process that had loaded a model
    inherits that process's high-water mark there, which hides the child's own peak."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_start() -> int:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _rss_peak_bytes(reset=True)


def _peak_growth_mib(start: int) -> float:
    if torch.cuda.is_available():
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    return (_rss_peak_bytes() - start) / 2**20


def measure_train_step(config: SpeedConfig, method_name: str) -> dict:
    """Seconds per optimizer step and peak-memory growth (MiB) of ``method_name`` (run in a fresh process)."""
    method, model, scorer = _setup(config, method_name)
    device = next(model.parameters()).device
    enc = _batch(config, "train", scorer.tokenizer, scorer).to(device)
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        loss = method.nll(model, scorer, enc, generator) + method.kl_scale(1000) * method.kl().to(device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start_mem = _peak_start()
    seconds = _timed(step, config.steps)
    peak = _peak_growth_mib(start_mem)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method_name, "step_s": seconds, "peak_mib": peak, "trainable_params": trainable}


def measure_predictive(config: SpeedConfig) -> list[dict]:
    """Predictive times of a BLoB model on one batch (see the module docstring)."""
    from ..methods.head import head_sample_logits

    method, model, scorer = _setup(config, "blob")
    model.eval()
    device = next(model.parameters()).device
    enc = _batch(config, "validation", scorer.tokenizer, scorer).to(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        base = _timed(lambda: scorer.choice_logits(model, enc), config.repeats)
        rows.append({"predictive": "deterministic forward (posterior mean)", "samples": 0, "seconds": base})
        for s in config.samples:
            for batched in (False, True):
                t = _timed(lambda: method.sample_logits(model, scorer, enc, s, g, batched=batched), config.repeats)
                rows.append({"predictive": f"MC, {'one batched forward' if batched else 'sequential forwards'}",
                             "samples": s, "seconds": t})
        s = max(config.samples)
        for chunk in (c for c in (2, 5) if c < s):
            method.config.sample_chunk = chunk
            t = _timed(lambda: method.sample_logits(model, scorer, enc, s, g), config.repeats)
            rows.append({"predictive": f"MC, batched forwards of {chunk} samples (sample_chunk={chunk})",
                         "samples": s, "seconds": t})
        method.config.sample_chunk = 0
        t = _timed(lambda: head_sample_logits(model, scorer, enc, s, g), config.repeats)
        rows.append({"predictive": "head (trunk once + LM-head samples)", "samples": s, "seconds": t})
        t = _timed(lambda: method.sample_logits(model, scorer, enc, 2, g, antithetic=True), config.repeats)
        rows.append({"predictive": "antithetic pair (eps, -eps), one batched forward", "samples": 2, "seconds": t})
        for n, antithetic in ((2, True), (s, True), (s, False)):
            t = _timed(lambda n=n, a=antithetic: method.sample_logits(model, scorer, enc, n, g, antithetic=a,
                                                                      mean_prompt=True), config.repeats)
            kind = "antithetic" if antithetic else "MC"
            rows.append({"predictive": f"mean prompt (prompt once + {kind} samples of the scored positions)",
                         "samples": n, "seconds": t})
    for row in rows:
        row["x_deterministic"] = row["seconds"] / base
    return rows


#: memory rows of the predictive part: (label, sample_chunk) at the largest S; None: the deterministic forward,
#: -1: S sequential forwards
PEAK_ROWS = (("deterministic forward (posterior mean)", None), ("MC, one batched forward", 0),
             ("MC, batched forwards of 5 samples (sample_chunk=5)", 5),
             ("MC, batched forwards of 2 samples (sample_chunk=2)", 2), ("MC, sequential forwards", -1))


def measure_predictive_peak(config: SpeedConfig, row: int) -> dict:
    """Peak memory growth of one predictive of :data:`PEAK_ROWS` on one batch, its first run in a fresh process
    (no warm-up, so nothing the allocator kept from an earlier run hides its peak)."""
    label, chunk = PEAK_ROWS[row]
    method, model, scorer = _setup(config, "blob")
    model.eval()
    enc = _batch(config, "validation", scorer.tokenizer, scorer).to(next(model.parameters()).device)
    g = torch.Generator().manual_seed(0)
    s = max(config.samples)
    method.config.sample_chunk = max(chunk or 0, 0)
    with torch.no_grad():
        start = _peak_start()
        if chunk is None:
            scorer.choice_logits(model, enc)
        else:
            method.sample_logits(model, scorer, enc, s, g, batched=chunk != -1)
        _sync()
        peak = _peak_growth_mib(start)
    return {"predictive": label, "samples": 0 if chunk is None else s, "peak_mib": peak}


def measure_scoring(config: SpeedConfig) -> list[dict]:
    """Shared-context cloze scoring vs one pass per row on one batch (empty for a letter-format model)."""
    from ..scoring import ClozeScorer
    from ..tasks import load_task

    _, model, scorer = _setup(config, "mle")
    if not isinstance(scorer, ClozeScorer):
        return []
    device = next(model.parameters()).device
    examples = shared_context_questions(scorer, load_task(config.dataset, "validation", config.data_dir),
                                        config.batch_size)
    if len(examples) < config.batch_size:
        raise ValueError(f"Fewer than {config.batch_size} {config.dataset} validation questions share one context "
                         f"across their choices at --max-length {scorer.max_length}")
    repeats = max(config.repeats, 3)
    encoded = {}
    for share in (False, True):
        scorer.share_prefix = share
        encoded[share] = scorer.encode(examples).to(device)
    scorer.share_prefix = True  # the encoded batch decides the path (prefix tensors present or not)

    def forward(enc):
        with torch.no_grad():
            scorer.choice_logits(model, enc)

    def forward_backward(enc):
        torch.nn.functional.cross_entropy(scorer.choice_logits(model, enc), enc.labels).backward()
        model.zero_grad(set_to_none=True)

    # the two settings alternate run by run, so that a change in the machine's load hits both alike
    times = {(share, fn.__name__): [] for share in encoded for fn in (forward, forward_backward)}
    for fn in (forward, forward_backward):
        for share in encoded:
            fn(encoded[share])  # warm-up
        for _ in range(repeats):
            for share, enc in encoded.items():
                _sync()
                t0 = time.perf_counter()
                fn(enc)
                _sync()
                times[share, fn.__name__].append(time.perf_counter() - t0)
    rows = []
    for share, enc in encoded.items():
        positions = enc.prefix_ids.numel() + enc.cont_ids.numel() if share else enc.input_ids.numel()
        rows.append({"scoring": "shared context, KV cache" if share else "one pass per (question, choice) row",
                     "positions": positions, "forward_s": statistics.median(times[share, "forward"]),
                     "forward_backward_s": statistics.median(times[share, "forward_backward"])})
    for row in rows:
        row["x_forward"] = row["forward_s"] / rows[0]["forward_s"]
        row["x_forward_backward"] = row["forward_backward_s"] / rows[0]["forward_backward_s"]
    return rows


def shared_context_questions(scorer, examples: list, n: int) -> list:
    """The first ``n`` questions whose choices share one context once encoded: a question cut at ``max_length``
    (left-truncation of context + choice) scores each choice after another context and cannot share it."""
    share, scorer.share_prefix = scorer.share_prefix, True
    try:
        return list(itertools.islice((ex for ex in examples if scorer.encode([ex]).shared_prefix), n))
    finally:
        scorer.share_prefix = share


#: fitted values of a post-hoc fit (``run.json``) shown next to its time
FIT_DETAILS = ("curvature_time_s", "prior_time_s", "prior_precision", "n_fit", "n_val", "sigma", "n_evaluations",
               "temperature")


def posthoc_entry(entry: str) -> tuple[str, dict]:
    """A ``--posthoc-methods`` entry, ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (options of the method's
    config, e.g. ``laplace:prior=marglik``), as ``(name, options)``."""
    from .variants import parse_option

    name, *pairs = entry.split(":")
    return name.strip(), dict(parse_option(p.strip()) for p in pairs)


def measure_posthoc_fit(config: SpeedConfig, entry: str, source: str, out: str) -> dict:
    """Fit the post-hoc method of ``entry`` (:func:`posthoc_entry`) to the MLE run ``source`` on the first
    ``fit_questions`` questions (run in a fresh process): the fit's own time (``run.json``), its peak-memory
    growth and what it fitted."""
    from ..posthoc import bayesianize

    name, options = posthoc_entry(entry)
    start = _peak_start()
    run = bayesianize(source, name, out, dataset=config.dataset, data_dir=config.data_dir, options=options,
                      limit=config.fit_questions, batch_size=config.batch_size)
    fit = json.loads((Path(run) / "run.json").read_text())["fit"]
    return {"method": entry, "fit_s": fit["time_s"], "peak_mib": _peak_growth_mib(start),
            "n_examples": fit.get("n_examples"), "split": fit.get("split"),
            "details": {k: fit[k] for k in FIT_DETAILS if k in fit}}


def measure_posthoc(config: SpeedConfig, log=print) -> list[dict]:
    """One MLE epoch over the fit questions, then every post-hoc method fitted on them (see the docstring)."""
    import tempfile

    from ..config import TrainConfig
    from ..train import train

    with tempfile.TemporaryDirectory() as tmp:
        steps = math.ceil(config.fit_questions / config.batch_size)
        log(f"[speed] posthoc: one MLE epoch ({steps} steps of {config.batch_size})")
        source = train(TrainConfig(model=config.model, dataset=config.dataset, data_dir=config.data_dir,
                                   batch_size=config.batch_size, max_steps=steps, train_limit=config.fit_questions,
                                   save_every=0, seed=0, format=config.format, dtype=config.dtype),
                       Path(config.keep_mle) if config.keep_mle else Path(tmp) / "mle", progress=False)
        epoch = json.loads((Path(source) / "run.json").read_text())["train_time_s"]
        log(f"[speed] posthoc: MLE epoch {epoch:.1f} s")
        rows = [{"method": "mle (one epoch)", "fit_s": epoch, "peak_mib": None,
                 "n_examples": config.fit_questions, "split": "train"}]
        for i, entry in enumerate(config.posthoc_methods):
            log(f"[speed] posthoc: {entry}")
            rows.append(_subprocess("--posthoc-fit", config, entry, str(source), str(Path(tmp) / f"fit{i}")))
            log(f"[speed] posthoc: {entry} done: {json.dumps(rows[-1])}")  # kept in the log if a later fit is cut
    for row in rows:
        row["x_epoch"] = row["fit_s"] / epoch
    return rows


def _subprocess(flag: str, config: SpeedConfig, method: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "bayeslora.bench.speed", flag, method, json.dumps(asdict(config)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"Benchmark {flag} of {method} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_speed(config: SpeedConfig, log=print, partial: Path | None = None) -> dict:
    """Both measurements; with ``partial``, each finished part is saved there at once and reused by a rerun with
    the same configuration (a long benchmark killed by a time limit goes on where it stopped)."""
    from ..tasks import load_task

    load_task(config.dataset, "train", config.data_dir, limit=config.batch_size)  # a bad name fails here, not in a child
    result = {"config": asdict(config), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "commits": [git_commit()]}
    if partial is not None and Path(partial).is_file():
        saved = json.loads(Path(partial).read_text())
        if saved.get("config") == result["config"]:
            # the parts measured by another commit keep it on record: a table may mix code versions
            commits = [c for c in saved.get("commits", ["unknown"]) if c != result["commits"][0]]
            result = saved | {"commits": [*commits, *result["commits"]]}
            done = [k for k in PARTS if k in saved]
            log(f"[speed] reusing the finished parts in {partial}: {done}")
    if "train" in config.parts and "train" not in result:
        runs: dict[str, list[dict]] = {m: [] for m in config.methods}
        for r in range(config.rounds):  # methods take turns, so drift over time hits them alike
            for method in config.methods:
                log(f"[speed] training step: {method}" + (f" (round {r + 1}/{config.rounds})" if config.rounds > 1
                                                          else ""))
                runs[method].append(_subprocess("--train-step", config, method))
        result["train"] = train_rows(runs)
        _save_partial(partial, result)
    if "predictive" in config.parts and "predictive" not in result:
        log("[speed] predictive")
        result["predictive"] = measure_predictive(config)
        _save_partial(partial, result)
    if "predictive" in config.parts and "predictive_memory" not in result:
        log("[speed] predictive: peak memory, one subprocess per row")
        rows = [_subprocess("--predictive-peak", config, str(i)) for i in range(len(PEAK_ROWS))]
        for row in rows:
            row["x_peak"] = row["peak_mib"] / rows[0]["peak_mib"] if rows[0]["peak_mib"] > 0 else None
        result["predictive_memory"] = rows
        _save_partial(partial, result)
    if "scoring" in config.parts and "scoring" not in result:
        log("[speed] cloze scoring: shared context vs one pass")
        result["scoring"] = measure_scoring(config)
        _save_partial(partial, result)
    if "posthoc" in config.parts and "posthoc" not in result:
        result["posthoc"] = measure_posthoc(config, log)
        _save_partial(partial, result)
    return result


def train_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per method from its rounds (``runs[method][r]``: one subprocess's measurement): the median step and
    peak over rounds, and the ratios to MLE (without an MLE row: to the first method) taken within each round, then
    their median, min and max; a ratio of medians over separate processes would carry each process's own offset."""
    ref = "mle" if "mle" in runs else next(iter(runs))
    rows = []
    for measured in runs.values():
        row = dict(measured[0])
        row["step_s"] = statistics.median(m["step_s"] for m in measured)
        row["peak_mib"] = statistics.median(m["peak_mib"] for m in measured)
        ratios = [m["step_s"] / r["step_s"] for m, r in zip(measured, runs[ref], strict=True)]
        row["x_step"] = statistics.median(ratios)
        row["step_s_rounds"] = [m["step_s"] for m in measured]
        row["x_step_range"] = [min(ratios), max(ratios)]
        peak_ref = statistics.median(m["peak_mib"] for m in runs[ref])
        row["x_peak"] = row["peak_mib"] / peak_ref if peak_ref > 0 else None
        rows.append(row)
    return rows


def _save_partial(path: Path | None, result: dict) -> None:
    if path is not None:
        atomic_write_text(Path(path), json_text(result, indent=2) + "\n")


def _num(value, spec: str) -> str:
    """``value`` formatted with ``spec``; "–" where nothing was measured (``None``, NaN)."""
    return "–" if value is None or value != value else format(value, spec)


def format_markdown(result: dict, command: str) -> str:
    c = result["config"]
    parts = c.get("parts", ["train", "predictive"])
    lines = [f"Model `{c['model']}` on {result['device']}, batch of {c['batch_size']} `{c['dataset']}` questions "
             f"(cloze/letter as `--format {c.get('format', 'auto')}`), LoRA r=8 on q_proj, v_proj, lm_head"
             + (f", {c['dtype']}" if c.get("dtype", "auto") != "auto" else "") + ".", ""]
    if "train" in parts:
        lines += _train_lines(result)
    if "predictive" in parts:
        lines += _predictive_lines(result)
    if "scoring" in parts:
        lines += _scoring_lines(result)
    if "posthoc" in parts:
        lines += _posthoc_lines(result)
    commits = ", ".join(result.get("commits") or ["not recorded"])
    lines += ["Command:", "", "```", command, "```", "", *environment_lines(),
              f"bayeslora commit{'s' if ',' in commits else ''}: {commits}."]
    return "\n".join(lines) + "\n"


def _missing(part: str) -> str:
    return f"(not measured yet: the run stopped before the {part} part; rerun the command to finish it)"


def _train_lines(result: dict) -> list[str]:
    c = result["config"]
    rounds = c.get("rounds", 1)
    how = ("one subprocess per method" if rounds == 1 else
           f"{rounds} rounds, each one subprocess per method in turn; step: median over rounds; x MLE: median of the "
           "rounds' ratios, with their range")
    lines = [f"Training step (median of {c['steps']} after 1 warm-up; peak memory: growth of the process's peak "
             f"RSS over the steps on CPU, `max_memory_allocated` on CUDA; {how}):", "",
             "| method | step s | x MLE | peak MiB | x MLE | trainable params |", "|---|---|---|---|---|---|"]
    if "train" not in result:
        return [*lines[:-2], _missing("training"), ""]
    for r in result["train"]:
        ratio = f"{r['x_step']:.2f}"
        if rounds > 1 and "x_step_range" in r:
            ratio += f" ({r['x_step_range'][0]:.2f}-{r['x_step_range'][1]:.2f})"
        lines.append(f"| {r['method']} | {r['step_s']:.3f} | {ratio} | {_num(r['peak_mib'], '.0f')} | "
                     f"{_num(r['x_peak'], '.2f')} | {r['trainable_params']:,} |")
    return [*lines, ""]


def _predictive_lines(result: dict) -> list[str]:
    lines = [f"BLoB predictive on one batch (median of {result['config']['repeats']} after 1 warm-up):", ""]
    if "predictive" not in result:
        return [*lines, _missing("predictive"), ""]
    lines += ["| predictive | S | seconds | x deterministic |", "|---|---|---|---|"]
    for r in result["predictive"]:
        lines.append(f"| {r['predictive']} | {r['samples']} | {r['seconds']:.3f} | {r['x_deterministic']:.2f} |")
    if "predictive_memory" in result:
        lines += ["", "Peak memory of one predictive on the same batch, each in a fresh subprocess, its first run "
                  "(growth of the peak RSS on CPU, `max_memory_allocated` on CUDA, model loading excluded):", "",
                  "| predictive | S | peak MiB | x deterministic |", "|---|---|---|---|"]
        for r in result["predictive_memory"]:
            lines.append(f"| {r['predictive']} | {r['samples']} | {_num(r['peak_mib'], '.0f')} | "
                         f"{_num(r['x_peak'], '.2f')} |")
    return [*lines, ""]


def _scoring_lines(result: dict) -> list[str]:
    lines = [f"Cloze scoring of one batch (the first validation questions whose choices share their context), MLE model (median of {max(result['config']['repeats'], 3)} after 1 "
             "warm-up, the two settings alternating run by run; positions: padded token positions run through the "
             "model):", ""]
    if "scoring" not in result:
        return [*lines, _missing("scoring"), ""]
    if not result["scoring"]:
        return [*lines, "(not applicable: the model scores in letter format)", ""]
    lines += ["| scoring | positions | forward s | x one pass | forward + backward s | x one pass |",
              "|---|---|---|---|---|---|"]
    for r in result["scoring"]:
        lines.append(f"| {r['scoring']} | {r['positions']} | {r['forward_s']:.3f} | {r['x_forward']:.2f} | "
                     f"{r['forward_backward_s']:.3f} | {r['x_forward_backward']:.2f} |")
    return [*lines, ""]


def _posthoc_lines(result: dict) -> list[str]:
    c = result["config"]
    lines = [f"Post-hoc fit vs one MLE epoch over the first {c['fit_questions']} `{c['dataset']}` training questions "
             f"(batch {c['batch_size']}; each method with its defaults but the options its row names, on the same "
             "questions, in its own subprocess; "
             "fit time excludes model loading; peak memory: growth over the whole fit, model loading included):", ""]
    if "posthoc" not in result:
        return [*lines, _missing("posthoc"), ""]
    lines += ["| fit | split | questions | seconds | x MLE epoch | peak MiB | fitted |",
              "|---|---|---|---|---|---|---|"]
    for r in result["posthoc"]:
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r.get("details", {}).items()) or "–"
        lines.append(f"| {r['method']} | {r['split']} | {r['n_examples']} | {r['fit_s']:.1f} | {r['x_epoch']:.2f} | "
                     f"{_num(r['peak_mib'], '.0f')} | {details} |")
    return [*lines, ""]


def write_speed(result: dict, md_path: Path | None, json_path: Path | None, command: str) -> str:
    text = format_markdown(result, command)
    if md_path is not None:
        parts = result["config"].get("parts", ["train", "predictive"])
        title = "Speed: what uncertainty costs" if set(parts) - {"scoring"} else \
            "Speed: cloze scoring with a shared context vs one pass per row"
        atomic_write_text(Path(md_path), f"# {title}\n\n" + text)
    if json_path is not None:
        atomic_write_text(Path(json_path), json_text(result, indent=2) + "\n")
    return text


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] in ("--train-step", "--posthoc-fit",
                                                                      "--predictive-peak"):
    # internal: one method's (or predictive's) measurement in a fresh process (see _subprocess)
    _config = SpeedConfig(**json.loads(sys.argv[3]))
    if sys.argv[1] == "--train-step":
        print(json.dumps(measure_train_step(_config, sys.argv[2])))
    elif sys.argv[1] == "--predictive-peak":
        print(json.dumps(measure_predictive_peak(_config, int(sys.argv[2]))))
    else:
        print(json.dumps(measure_posthoc_fit(_config, sys.argv[2], *sys.argv[4:6])))
