from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bayeslora import TrainConfig, load_run, load_task, train
from bayeslora.train import TrainingError, batch_indices

TINY = dict(model="tiny-random-llama", dataset="arith", save_every=0)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "bayeslora.cli", *map(str, args)]


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(10, 4, seed=1, step=s) for s in range(5)]
    assert a == [batch_indices(10, 4, seed=1, step=s) for s in range(5)]
    seen = sum(a[:5], [])[:20]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations


def test_train_writes_a_reloadable_run(tmp_path):
    run_dir = train(TrainConfig(**TINY, max_steps=3, eval_every=3, eval_limit=8), tmp_path / "run", progress=False)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["method"] == "mle" and info["format"] == "cloze"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert "lm_head" in json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]
    # the adapter holds LoRA factors only, never a copy of the (tied) embedding matrix
    assert all("lora_" in k for k in _adapter(run_dir))
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "eval" in log[-1]
    run = load_run(run_dir)
    examples = load_task("arith", "validation", limit=4)
    p1 = run.predict(examples)
    p2 = load_run(run_dir).predict([{"question": "What is 1 + 1?", "choices": ["2", "3"]}])
    assert p1.probs.shape == (4, 4) and p2.probs.shape == (1, 2)
    assert torch.allclose(p1.probs, load_run(run_dir).predict(examples).probs)


def test_evaluating_during_training_changes_nothing_and_matches_eval(tmp_path):
    """With LoRA dropout, evaluation during training ran with the dropout on (other metrics than `bayeslora eval`)
    and drew it from the global RNG (another trajectory than the same run without --eval-every)."""
    from bayeslora import evaluate_examples
    from bayeslora.methods import AdapterConfig

    cfg = dict(**TINY, max_steps=4, lr=3e-2, adapter=AdapterConfig(dropout=0.5))
    plain = train(TrainConfig(**cfg), tmp_path / "plain", progress=False)
    evaluated = train(TrainConfig(**cfg, eval_every=2, eval_limit=12), tmp_path / "evaluated", progress=False)
    a, b = _adapter(plain), _adapter(evaluated)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = json.loads((evaluated / "train_log.jsonl").read_text().splitlines()[-1])["eval"]
    metrics, _ = evaluate_examples(load_run(evaluated), load_task("arith", "validation", limit=12))
    assert logged["nll"] == pytest.approx(metrics["nll"], abs=1e-5)  # the log keeps 5 decimals
    assert logged["acc"] == pytest.approx(metrics["acc"], abs=1e-5)


def test_the_log_holds_each_steps_own_learning_rate_and_objective(tmp_path):
    run_dir = train(TrainConfig(**{**TINY, "method": "blob"}, max_steps=10, lr=1e-3, warmup_ratio=0.5),
                    tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    # warmup over 5 steps to 1e-3, then linear decay: the rate each step's update used (the last is not 0)
    assert [r["lr"] for r in log] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    n_train = json.loads((run_dir / "run.json").read_text())["n_train"]
    for r in log:  # the objective and its KL part, as the loss adds them (BLoB: the KL over the training set size)
        assert r["kl_term"] == pytest.approx(r["kl"] / n_train, rel=1e-6)
        assert r["loss"] == pytest.approx(r["nll"] + r["kl_term"], rel=1e-6) and r["step_s"] > 0


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Make MLE's training step ``step`` raise KeyboardInterrupt, as Ctrl-C would; ``monkeypatch.undo()`` ends it."""
    from bayeslora.methods.mle import MLE

    original, calls = MLE.nll, {"n": 0}

    def nll(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(MLE, "nll", nll)


def test_training_time_adds_up_over_a_resume(tmp_path, monkeypatch):
    _interrupt_at_step(monkeypatch, 4)
    cfg = TrainConfig(**{**TINY, "save_every": 2}, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    before = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["elapsed_s"]
    monkeypatch.undo()
    train(cfg, tmp_path / "run", resume=True, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[2]["elapsed_s"] > before and log[2]["elapsed_s"] > log[1]["elapsed_s"]
    total = json.loads((tmp_path / "run" / "run.json").read_text())["train_time_s"]
    assert total >= log[-1]["elapsed_s"] > before
    train(cfg, tmp_path / "run", resume=True, progress=False)  # nothing left to do: the time stays
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train_time_s"] >= total


def test_epochs_cover_the_data():
    cfg = TrainConfig(**{**TINY, "max_steps": 0, "epochs": 1.0, "batch_size": 8})
    assert cfg.n_steps(20) == 3 and cfg.n_steps(16) == 2  # 2.5 steps: 3, not 2 (16 of 20 questions)
    assert TrainConfig(**{**TINY, "max_steps": 0, "epochs": 0.1, "batch_size": 8}).n_steps(80) == 1


def test_training_on_a_data_file_with_evaluation_warns(tmp_path):
    rows = [{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(8)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="evaluation during training is on training questions"):
        train(TrainConfig(model="tiny-random-llama", dataset=str(tmp_path / "mine.jsonl"), max_steps=2,
                          batch_size=2, save_every=0, eval_every=2), tmp_path / "run", progress=False)
    # held-out questions of one's own: --eval-dataset
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({**r, "question": f"{i} + 2 ="}) + "\n"
                                                 for i, r in enumerate(rows[:3])))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run = train(TrainConfig(model="tiny-random-llama", dataset=str(tmp_path / "mine.jsonl"), max_steps=2,
                                batch_size=2, save_every=0, eval_every=2, eval_dataset=str(tmp_path / "held.jsonl")),
                    tmp_path / "held-run", progress=False)
    last = json.loads((run / "train_log.jsonl").read_text().splitlines()[-1])
    assert last["eval"]["n"] == 3


def test_an_out_that_is_a_file_is_refused_first(tmp_path):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(TrainingError, match="is a file"):
        train(TrainConfig(**TINY, max_steps=1), tmp_path / "afile", progress=False)
    assert (tmp_path / "afile").read_text() == "keep"


def test_training_changes_only_the_adapter(tmp_path):
    run_dir = train(TrainConfig(**TINY, max_steps=2, lr=1e-2), tmp_path / "run", progress=False)
    run = load_run(run_dir)
    from bayeslora.models import load_model
    base = load_model("tiny-random-llama").model.state_dict()
    for name, p in run.model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), name
    assert any(v.abs().sum() > 0 for k, v in _adapter(run_dir).items() if "lora_B" in k)


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    with pytest.raises(TrainingError, match="not empty"):
        train(TrainConfig(**TINY, max_steps=1), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from bayeslora.methods.mle import MLE

    calls = {"n": 0}
    original = MLE.nll

    def nll(self, *args, **kwargs):
        calls["n"] += 1
        value = original(self, *args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value
    monkeypatch.setattr(MLE, "nll", nll)
    cfg = TrainConfig(**{**TINY, "save_every": 2}, max_steps=5)
    with pytest.raises(TrainingError, match="at step 3") as err:
        train(cfg, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    # what it says can be done: --resume repeats the step bit for bit, so a new run is the way
    assert "last good checkpoint is in" in str(err.value) and "new --out" in str(err.value)
    calls["n"] = 0
    with pytest.raises(TrainingError, match="at step 3") as err:  # no checkpoint yet: none is named
        train(TrainConfig(**{**TINY, "save_every": 0}, max_steps=5), tmp_path / "early", progress=False)
    assert "checkpoint" not in str(err.value) and "--lr" in str(err.value)


def test_a_damaged_checkpoint_is_named_on_resume(tmp_path):
    """A checkpoint that does not fit the run (hand-edited, another run's) is an error that names it, before any
    step, instead of a traceback from deep inside torch."""
    from safetensors.torch import save_file

    cfg = TrainConfig(**{**TINY, "save_every": 2}, max_steps=4)
    done = train(cfg, tmp_path / "run", progress=False)
    edits = {
        "extra tensor": lambda ck: save_file({**load_file(str(ck / "trainable.safetensors")), "zzz": torch.zeros(1)},
                                             str(ck / "trainable.safetensors")),
        "wrong shape": lambda ck: save_file({k: torch.zeros(3) for k in load_file(str(ck / "trainable.safetensors"))},
                                            str(ck / "trainable.safetensors")),
        "rng": lambda ck: save_file({"torch": torch.zeros(2, dtype=torch.uint8)}, str(ck / "rng.safetensors")),
        "state": lambda ck: (ck / "state.json").write_text(json.dumps({"step": 2})),
        "step": lambda ck: (ck / "state.json").write_text(json.dumps(
            {**json.loads((ck / "state.json").read_text()), "step": 10**6})),
        "optimizer": lambda ck: torch.save({"a": "b"}, ck / "optimizer.pt"),
    }
    for name, edit in edits.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(done, copy)
        edit(copy / "checkpoint")
        with pytest.raises(TrainingError, match="Checkpoint .* (does not match|does not fit|is at step|unreadable)"):
            train(cfg, copy, resume=True, progress=False)


def test_resume_without_a_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    """A run stopped before its first checkpoint starts over on --resume: its log must not keep the old steps."""
    _interrupt_at_step(monkeypatch, 3)
    cfg = TrainConfig(**{**TINY, "save_every": 0}, max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 2
    monkeypatch.undo()
    train(cfg, tmp_path / "run", resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("field, value", [("seed", 2**40), ("seed", -1), ("epochs", float("inf")),
                                          ("epochs", float("nan")), ("eval_every", -1), ("save_every", -1),
                                          ("eval_limit", 0)])
def test_settings_are_checked_before_a_folder_is_made(field, value):
    """Each used to pass the config and fail later (a seed of 2^40 overflowed the data order's seed after the run
    folder was made; NaN epochs crashed planning the steps; inf epochs planned ~1e303 steps)."""
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**TINY, "max_steps": 0, "epochs": 1.0, field: value})


@pytest.mark.parametrize("alpha", [-16.0, 0.0, float("nan"), float("inf")])
def test_lora_alpha_must_be_positive(alpha):
    from bayeslora.methods import AdapterConfig

    with pytest.raises(ValueError, match="alpha"):
        AdapterConfig(alpha=alpha)


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    args = ["train", "--model", "tiny-random-llama", "--dataset", "arith", "--max-steps", 40, "--save-every", 5,
            "--lr", "1e-3", "--no-progress", "--seed", 3]
    subprocess.run(_cli(*args, "--out", tmp_path / "full"), check=True, env=ENV, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 5 <= step < 40, "the run must be killed mid-way"
    assert json.loads((killed / "run.json").read_text())["status"] == "training"

    subprocess.run(_cli(*args, "--out", killed, "--resume"), check=True, env=ENV, capture_output=True)
    full, resumed = _adapter(tmp_path / "full"), _adapter(killed)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_resume_refuses_what_it_cannot_continue_and_touches_nothing(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(TrainingError, match="not a run started by `bayeslora train`"):
        train(TrainConfig(**TINY, max_steps=2), foreign, resume=True, progress=False)
    assert _tree(foreign) == {"notes.txt": b"precious"}

    run = train(TrainConfig(**TINY, max_steps=2, lr=1e-3), tmp_path / "run", progress=False)
    posthoc = tmp_path / "posthoc"  # a post-hoc run's run.json has no training settings
    shutil.copytree(run, posthoc)
    info = json.loads((posthoc / "run.json").read_text())
    del info["train"]
    (posthoc / "run.json").write_text(json.dumps(info))
    before = _tree(posthoc)
    with pytest.raises(TrainingError, match="not a run started by `bayeslora train`"):
        train(TrainConfig(**TINY, max_steps=2, lr=1e-3), posthoc, resume=True, progress=False)
    assert _tree(posthoc) == before

    before = _tree(run)
    with pytest.raises(TrainingError, match=r"lr: 0\.001 saved, 0\.5 given; method: 'mle' saved, 'map' given"):
        train(TrainConfig(**{**TINY, "method": "map"}, max_steps=2, lr=0.5), run, resume=True, progress=False)
    assert _tree(run) == before
    # settings that do not change the trajectory may change; the finished run stays as it was
    train(TrainConfig(**{**TINY, "save_every": 1}, max_steps=2, lr=1e-3, eval_limit=5), run, resume=True,
          progress=False)
    assert _adapter(run).keys() == load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()


def test_a_user_file_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    rows = [{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(8)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    train(TrainConfig(model="tiny-random-llama", dataset="data/mine.jsonl", max_steps=1, batch_size=2,
                      save_every=0), "run", progress=False)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["dataset"] == str(tmp_path / "data" / "mine.jsonl") == saved["train"]["dataset"]
    # ... with its content's digest: --resume refuses a file that changed since (it used to go on with it)
    import hashlib

    assert saved["dataset_sha256"] == hashlib.sha256((tmp_path / "data" / "mine.jsonl").read_bytes()).hexdigest()
    (tmp_path / "data" / "mine.jsonl").write_text("".join(json.dumps({**r, "answer": 1}) + "\n" for r in rows))
    with pytest.raises(TrainingError, match="has changed since"):
        train(TrainConfig(model="tiny-random-llama", dataset="data/mine.jsonl", max_steps=1, batch_size=2,
                          save_every=0), "run", resume=True, progress=False)


@pytest.mark.parametrize("method", ["mle", "blob", "mcd"])
def test_two_processes_agree(tmp_path, method):
    """`accelerate launch` with 2 CPU processes (gloo): DDP keeps both in sync, and the trajectory matches one
    process (the global batch is split, not duplicated), for the sampling methods too: each question gets the
    weight sample (BLoB noise, dropout mask) it gets in one process (they differed by as much as the whole
    update when each process drew from its own stream)."""
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate launcher not installed")
    args = ["train", "--model", "tiny-random-llama", "--dataset", "arith", "--max-steps", 4, "--no-progress",
            "--lr", "1e-2", "--method", method]
    if method == "blob":
        args += ["--option", "init_eps=0.5"]  # noise large enough that a different draw shows
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bayeslora.cli"]
    out = subprocess.run([*launcher, *map(str, args), "--out", str(tmp_path / "ddp")], env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert info["num_processes"] == 2 and info["processes_agree"] is True
    subprocess.run(_cli(*args, "--out", tmp_path / "single"), check=True, env=ENV, capture_output=True)
    ddp, single = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "single")
    for key in single:
        assert torch.allclose(ddp[key], single[key], atol=1e-4), key  # each process pads its own rows
    if method == "blob":  # the posterior's scales too
        from safetensors.torch import load_file

        ddp_post, single_post = (load_file(str(tmp_path / d / "posterior.safetensors")) for d in ("ddp", "single"))
        for key in single_post:
            assert torch.allclose(ddp_post[key], single_post[key], atol=1e-4), key


def test_auto_format_follows_the_model_size_not_its_spec(tmp_path):
    """A small model named by a path (a .gguf file, a directory) is scored in cloze like its built-in spec: by
    letter, SmolLM2-135M fine-tuned on all of ARC-E stayed at chance (the GPU grid, docs/FINDINGS.md)."""
    from bayeslora.config import resolve_format
    from bayeslora.models import load_model, random_config

    tiny = load_model("tiny-random-llama", device="cpu").model
    assert resolve_format("auto", "/models/SmolLM2-135M-Instruct.Q4_1.gguf", tiny) == "cloze"
    assert resolve_format("auto", "some/dir") == "letter"  # no model at hand: only the built-in specs are known
    assert resolve_format("letter", "tiny-random-llama", tiny) == "letter"
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        big = LlamaForCausalLM(random_config("random:llama2-7b")[0])
    assert resolve_format("auto", "meta-llama/Llama-2-7b-hf", big) == "letter"
    # the training loop resolves auto with the loaded model and records the result
    tiny_dir = tmp_path / "tiny-model"
    loaded = load_model("tiny-random-llama", device="cpu")
    loaded.model.save_pretrained(tiny_dir)
    loaded.tokenizer.save_pretrained(tiny_dir)
    config = TrainConfig(**{**TINY, "model": str(tiny_dir)}, max_steps=1)
    assert config.format == "auto"
    info = json.loads((train(config, tmp_path / "run", progress=False) / "run.json").read_text())
    assert info["format"] == "cloze" and info["train"]["format"] == "cloze"


def test_dtype_is_trained_in_and_kept_by_eval_and_bayesianize(tmp_path):
    from bayeslora.config import ConfigError
    from bayeslora.posthoc import bayesianize

    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(**TINY, max_steps=1, dtype="float8")
    run_dir = train(TrainConfig(**TINY, max_steps=1, dtype="bfloat16"), tmp_path / "run", progress=False)
    assert json.loads((run_dir / "run.json").read_text())["dtype"] == "bfloat16"
    assert next(load_run(run_dir).model.parameters()).dtype == torch.bfloat16
    out = bayesianize(run_dir, "temperature", out=tmp_path / "temp", limit=8)
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    assert next(load_run(out).model.parameters()).dtype == torch.bfloat16
    # runs written before the option (no dtype in run.json) load in the device's default
    info = json.loads((run_dir / "run.json").read_text())
    del info["dtype"]
    (run_dir / "run.json").write_text(json.dumps(info))
    assert next(load_run(run_dir).model.parameters()).dtype == torch.float32


def test_evaluating_an_unfinished_run_says_how_to_finish_it(tmp_path):
    from bayeslora.methods import MethodError

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)  # killed after a checkpoint, before the final adapter
    (run / "run.json").write_text(json.dumps({"model": "tiny-random-llama", "method": "mle", "format": "cloze",
                                              "status": "training"}))
    with pytest.raises(MethodError, match=f"did not finish.*--out {run} --resume"):
        load_run(run)
