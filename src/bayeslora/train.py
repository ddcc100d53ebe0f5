"""One generic training loop on Hugging Face accelerate, for every method: ``loss = nll + kl_scale * kl``.

The same code runs on one CPU, one GPU, or ``accelerate launch --num_processes N`` (DDP): each optimizer step
takes a global batch of ``batch_size`` questions (a deterministic function of the seed and the step), split into
``grad_accum`` micro-batches and each of those across the processes, so the trajectory does not depend on the
number of processes. Checkpoints are written atomically every ``save_every`` steps and ``resume=True`` continues
from the last one, bit for bit on CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig, resolve_format
from .evaluate import evaluate_examples
from .io_utils import atomic_dir, atomic_write_text, check_writable_folder, json_text
from .methods import BayesianMethod, build_method, get_method_class
from .methods.base import CHECKPOINT_DIR
from .methods.posthoc_base import PosthocMethod
from .models import global_rng_kept, load_model, parse_dtype
from .runs import Run, read_run_info, write_run_info
from .scoring import make_scorer
from .tasks import is_user_file, load_task

LOG_FILE = "train_log.jsonl"
#: training settings a resumed run may change: they do not change its trajectory
RESUME_FREE = ("data_dir", "eval_every", "eval_split", "eval_limit", "eval_dataset", "save_every")


class TrainingError(ValueError):
    """Training cannot go on (e.g. a non-finite loss); the message says which step and what was kept."""


def batch_indices(n_train: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the global batch of optimizer step ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return out


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model, optimizer, scheduler, generator, step: int, elapsed_s: float) -> None:
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        rng = {"generator": generator.get_state(), "torch": torch.random.get_rng_state()}
        save_file(rng, str(tmp / "rng.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                    "elapsed_s": elapsed_s}))


def _load_checkpoint(path: Path, model, optimizer, scheduler, generator, total: int) -> tuple[int, float]:
    """Restore the training state saved in ``path``; returns its step and the training time until then (0 for
    checkpoints written before it was recorded). Anything that does not fit this run is a :class:`TrainingError`
    naming the checkpoint, before the run goes on."""
    try:
        params = load_file(str(path / "trainable.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", weights_only=True)  # never unpickle arbitrary objects
        state = json.loads((path / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"Checkpoint {path} is unreadable ({exc}); remove it to start over") from exc
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(named) - set(params)), sorted(set(params) - set(named))
    if missing or unexpected:
        raise TrainingError(f"Checkpoint {path} does not match this model/method (missing {missing[:2]}, "
                            f"unexpected {unexpected[:2]}); remove it to start over")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise TrainingError(f"Checkpoint {path} is at step {step!r}, not a step of this run's {total}; remove it to "
                            "start over")
    try:
        with torch.no_grad():
            for name, value in params.items():
                if value.shape != named[name].shape or not torch.isfinite(value).all():
                    raise ValueError(f"{name} has shape {tuple(value.shape)} or non-finite values")
                named[name].copy_(value)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(rng["generator"])
        torch.random.set_rng_state(rng["torch"])
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign state: torch raises many types
        raise TrainingError(f"Checkpoint {path} does not fit this run ({type(exc).__name__}: {exc}); remove it to "
                            "start over") from None
    elapsed = state.get("elapsed_s", 0.0)
    return step, float(elapsed) if isinstance(elapsed, int | float) and math.isfinite(elapsed) else 0.0


def _check_resumable(run_dir: Path, config: TrainConfig) -> dict | None:
    """``--resume`` continues a run that ``bayeslora train`` started in ``run_dir``, with the same settings; an empty
    or absent ``run_dir`` starts one. Anything else is refused before a file is touched. Returns the saved
    settings (``None``: nothing to continue)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    try:
        saved_info = read_run_info(run_dir)
        saved = saved_info.get("train")
    except Exception:  # noqa: BLE001  (missing or corrupted run.json: not a run we can continue)
        saved_info, saved = {}, None
    if not isinstance(saved, dict):
        raise TrainingError(f"{run_dir} is not a run started by `bayeslora train` (no run.json with its training "
                            "settings): --resume only continues such a run; choose another --out")
    now = json.loads(json.dumps(config.to_dict()))
    if now.get("format") == "auto":  # the saved format is the one `auto` resolved to
        now["format"] = saved.get("format")
    same_file = is_user_file(str(saved.get("dataset"))) and is_user_file(now["dataset"])
    if same_file and Path(str(saved["dataset"])).resolve() == Path(now["dataset"]).resolve():
        now["dataset"] = saved["dataset"]  # a run saved before its file was recorded by absolute path
    differ = [k for k in sorted(set(saved) | set(now)) if k not in RESUME_FREE and saved.get(k) != now.get(k)]
    if differ:
        listed = "; ".join(f"{k}: {saved.get(k)!r} saved, {now.get(k)!r} given" for k in differ)
        raise TrainingError(f"--resume continues {run_dir} with the settings it was started with, and these differ: "
                            f"{listed}. Pass the saved values, or choose another --out")
    digest = saved_info.get("dataset_sha256")
    if digest and Path(str(saved.get("dataset"))).is_file() and file_digest(Path(saved["dataset"])) != digest:
        raise TrainingError(f"--resume continues {run_dir} on the data it was started with, and the file "
                            f"{saved['dataset']} has changed since; restore it, or choose another --out")
    return saved


def file_digest(path: Path) -> str:
    """SHA-256 of a data file's bytes: a run records what it trained on, and a resume checks it is the same."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _micro_batches(indices: list[int], grad_accum: int, rank: int, world: int) -> list[list[int]]:
    size = len(indices) // grad_accum
    return [indices[i * size:(i + 1) * size][rank::world] for i in range(grad_accum)]


def _log(run_dir: Path, record: dict) -> None:
    with (run_dir / LOG_FILE).open("a") as fh:
        fh.write(json_text(record) + "\n")  # strict JSON: a NaN metric (AUROC of an all-correct batch) is null


def _truncate_log(run_dir: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be redone)."""
    path = run_dir / LOG_FILE
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def _save_final(run_dir: Path, method: BayesianMethod, model, info: dict, tokenizer) -> None:
    """Write adapter + posterior + run.json; each piece is replaced atomically."""
    staging = run_dir / ".final-staging"
    with atomic_dir(staging) as tmp:
        method.save(model, tmp)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for item in staging.iterdir():
        target = run_dir / item.name
        if item.is_dir():
            with atomic_dir(target) as tmp_target:
                os.rmdir(tmp_target)
                os.replace(item, tmp_target)
        else:
            os.replace(item, target)
    staging.rmdir()
    write_run_info(run_dir, info)


def train(config: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune ``config.model`` with ``config.method`` on ``config.dataset``; returns the run directory.

    ``config`` is not changed (``run.json`` holds the resolved copy: the format ``auto`` chose, the data file's
    absolute path), and the global torch RNG is as it was before the call (PEFT's initialization and MC-dropout
    draw from it, seeded with ``config.seed``). A post-hoc method (Laplace, TFB, temperature scaling) is refused:
    it is fitted to a trained run by :func:`bayeslora.posthoc.bayesianize`.
    """
    config = copy.deepcopy(config)
    cls = get_method_class(config.method)
    if issubclass(cls, PosthocMethod):
        raise TrainingError(
            f"Method {config.method!r} is fitted post hoc to a trained adapter, not trained: train an mle or map run, "
            f"then `bayeslora bayesianize RUN_DIR --method {config.method} --out DIR` (Python: "
            f"bayeslora.bayesianize(RUN_DIR, {config.method!r}, DIR))")
    try:
        check_writable_folder(Path(out_dir))  # before the model loads
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    with global_rng_kept():
        return _train(config, Path(out_dir), resume, progress)


def _train(config: TrainConfig, run_dir: Path, resume: bool, progress: bool) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if is_user_file(config.dataset) and Path(config.dataset).is_file():
        config.dataset = str(Path(config.dataset).resolve())  # run.json must find it from any directory
    if config.eval_dataset and is_user_file(config.eval_dataset) and Path(config.eval_dataset).is_file():
        config.eval_dataset = str(Path(config.eval_dataset).resolve())
    saved = _check_resumable(run_dir, config) if resume else None
    if saved is not None:
        config.format = saved.get("format", config.format)  # `auto` resolved as it was when the run started
        config.dataset = saved.get("dataset", config.dataset)
    elif not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"Output directory {run_dir} is not empty: choose another --out or pass --resume")
    method = build_method(config.method, config.method_options)
    train_set = load_task(config.dataset, "train", config.data_dir, config.source, limit=config.train_limit)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    eval_set = _eval_set(config) if config.eval_every and accelerator.is_main_process else None  # before the model
    if (config.batch_size // config.grad_accum) % world:
        raise TrainingError(f"The micro-batch ({config.batch_size // config.grad_accum}) must split evenly over "
                            f"{world} processes")
    torch.manual_seed(config.seed)  # PEFT initializes LoRA with the global RNG: same init on every process
    loaded = load_model(config.model, device=accelerator.device, dtype=parse_dtype(config.dtype), progress=progress)
    model = method.prepare(loaded.model, config.adapter)
    config.format = resolve_format(config.format, config.model, loaded.model)
    scorer = make_scorer(config.format, loaded.tokenizer, config.max_length)
    n_choices = max(ex.n_choices for ex in train_set)
    total = config.n_steps(len(train_set))
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=config.lr)
    scheduler = linear_schedule(optimizer, round(config.warmup_ratio * total), total)
    # the same stream on every process: each draws the whole global batch's samples and keeps its questions'
    # (SamplingState.shard), so the trajectory and a checkpoint's generator do not depend on the process count
    generator = torch.Generator(device="cpu").manual_seed(config.seed * 1000)

    info = {"model": loaded.spec, "format": config.format, "dtype": config.dtype, "max_length": config.max_length,
            "method": method.name, "method_config": method.config.to_dict(), "adapter": config.to_dict()["adapter"],
            "dataset": config.dataset, "n_train": len(train_set), "n_choices": n_choices, "steps": total,
            "train": config.to_dict()}
    if is_user_file(config.dataset) and Path(config.dataset).is_file():
        info["dataset_sha256"] = file_digest(Path(config.dataset))
    start, elapsed0 = 0, 0.0  # elapsed0: training time before this process (a resumed run's, from its checkpoint)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, {**info, "status": "training"})
    if resume and (run_dir / CHECKPOINT_DIR).is_dir():
        start, elapsed0 = _load_checkpoint(run_dir / CHECKPOINT_DIR, model, optimizer, scheduler, generator, total)
    if resume and accelerator.is_main_process:
        _truncate_log(run_dir, start)  # steps after the checkpoint (all of them, without one) are redone
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"train {method.name}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed0  # time since the run started, across resumes
    for step in range(start, total):
        t_step = time.perf_counter()
        indices = batch_indices(len(train_set), config.batch_size, config.seed, step)
        nll_sum, kl_sum = 0.0, 0.0
        micro = _micro_batches(indices, config.grad_accum, rank, world)
        for i, chunk in enumerate(micro):
            enc = scorer.encode([train_set[j] for j in chunk], n_choices=n_choices).to(accelerator.device)
            sync = accelerator.no_sync(model) if i < len(micro) - 1 else _nullcontext()
            with sync:
                nll = method.nll(model, scorer, enc, generator, shard=(rank, world))
                kl = method.kl().to(nll.device)
                loss = (nll + method.kl_scale(len(train_set)) * kl) / config.grad_accum
                accelerator.backward(loss)
            # one host read per micro-batch, after its backward is queued (a read between the forward and the
            # backward would make the host wait for the device); a non-finite loss stops before the update
            values = torch.stack([loss.detach().float(), nll.detach().float(), kl.detach().float()])
            loss_v, nll_v, kl_v = values.tolist()
            if not math.isfinite(loss_v):
                saved = ""
                if (run_dir / CHECKPOINT_DIR).is_dir():
                    # --resume repeats the same steps bit for bit, so it would diverge again
                    saved = (f" The last good checkpoint is in {run_dir / CHECKPOINT_DIR}; resuming with the same "
                             "settings would repeat this step.")
                raise TrainingError(
                    f"The loss became {loss_v} at step {step + 1} (nll {nll_v}, kl {kl_v}); stopped.{saved} Start "
                    f"again in a new --out (or remove {run_dir}) with a lower --lr, more warm-up or gradient "
                    "clipping (--max-grad-norm)")
            nll_sum += nll_v / config.grad_accum
            kl_sum += kl_v / config.grad_accum
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate of this step's update (scheduler.step() moves to the next)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        nll_mean = accelerator.reduce(torch.tensor(nll_sum, device=accelerator.device), "mean").item()
        kl_term = method.kl_scale(len(train_set)) * kl_sum
        record = {"step": done, "loss": nll_mean + kl_term, "nll": nll_mean, "kl": kl_sum, "kl_term": kl_term,
                  "lr": lr, "step_s": round(time.perf_counter() - t_step, 3),
                  "elapsed_s": round(time.perf_counter() - t0, 3)}
        if eval_set is not None and done % config.eval_every == 0:
            record["eval"] = _evaluate_during_training(accelerator.unwrap_model(model), method, scorer, eval_set)
            model.train()
        if accelerator.is_main_process:
            _log(run_dir, record)
            if bar is not None:
                bar.set_postfix(nll=f"{nll_mean:.3f}", **({"kl_term": f"{kl_term:.3f}"} if kl_term else {}))
                bar.update(1)
        if config.save_every and done % config.save_every == 0 and done < total:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(run_dir / CHECKPOINT_DIR, accelerator.unwrap_model(model), optimizer, scheduler,
                                 generator, done, time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(model)
    final.eval()
    info["num_processes"] = world
    info["processes_agree"] = _processes_agree(accelerator, final)
    if accelerator.is_main_process:
        _save_checkpoint(run_dir / CHECKPOINT_DIR, final, optimizer, scheduler, generator, total,
                         time.perf_counter() - t0)
        info["train_time_s"] = round(time.perf_counter() - t0, 2)
        _save_final(run_dir, method, final, {**info, "status": "done"}, loaded.tokenizer)
    accelerator.wait_for_everyone()
    return run_dir


def _processes_agree(accelerator, model) -> bool:
    """Whether every process ends with bit-identical trainable weights (DDP must keep them in sync)."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in trainable_state(model).values()])
    digest = torch.tensor([flat.sum().item(), (flat * torch.arange(flat.numel()) % 9973).sum().item()],
                          dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(digest[None]).view(-1, 2)
    agree = bool((gathered == gathered[0]).all())
    if not agree:
        raise TrainingError(f"The {accelerator.num_processes} processes ended with different weights: {gathered}")
    return agree


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _eval_set(config: TrainConfig):
    """The questions of the evaluation during training: ``eval_dataset``'s (a data file: all of it), else the
    training dataset's ``eval_split``."""
    dataset = config.eval_dataset or config.dataset
    if is_user_file(dataset) and Path(dataset).resolve() == Path(config.dataset).resolve():
        warnings.warn(f"--eval-every on the data file {config.dataset}: a data file is one split, so the evaluation "
                      "during training is on training questions (it shows fit, not generalization); give held-out "
                      "questions with --eval-dataset FILE", stacklevel=3)
    return load_task(dataset, config.eval_split, config.data_dir, config.source, limit=config.eval_limit)


def _evaluate_during_training(model, method, scorer, examples) -> dict:
    """Metrics on the evaluation questions, as `bayeslora eval` would give them: in eval mode (no LoRA dropout) and
    without touching the global RNG, so that evaluating does not change the training trajectory."""
    run = Run(model=model, tokenizer=scorer.tokenizer, method=method, scorer=scorer)
    model.eval()
    with global_rng_kept():
        metrics, _ = evaluate_examples(run, examples, progress=False)
    return {k: round(v, 5) if isinstance(v, float) and math.isfinite(v) else v for k, v in metrics.items()}
