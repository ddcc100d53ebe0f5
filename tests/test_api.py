"""The Python API as a library user meets it (README, "Python API"): inputs are checked by name, the caller's
objects and global state are left alone, and plots do not touch pyplot. Tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bayeslora import TrainConfig, bayesianize, evaluate_examples, load_run, train
from bayeslora.config import ConfigError
from bayeslora.methods import MethodError, build_method
from bayeslora.tasks import DatasetError
from bayeslora.train import TrainingError

TINY = dict(model="tiny-random-llama", dataset="arith", save_every=0, batch_size=4, train_limit=16)
Q = [{"question": "Which is bigger?", "choices": ["one", "two", "three"]}]


@pytest.fixture(scope="module")
def mle_dir(tmp_path_factory):
    return train(TrainConfig(**TINY, max_steps=2), tmp_path_factory.mktemp("api") / "mle", progress=False)


@pytest.mark.parametrize("method", ["laplace", "tfb", "temperature"])
def test_train_refuses_post_hoc_methods_before_writing(tmp_path, method):
    with pytest.raises(TrainingError, match="post hoc.*bayesianize"):
        train(TrainConfig(**TINY, method=method, max_steps=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_leaves_its_config_and_the_global_rng_alone(tmp_path):
    config = TrainConfig(**TINY, max_steps=1, method="mcd")  # dropout draws from the global RNG while training
    before = json.dumps(config.to_dict(), sort_keys=True)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    run_dir = train(config, tmp_path / "run", progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert json.dumps(config.to_dict(), sort_keys=True) == before and config.format == "auto"
    assert json.loads((run_dir / "run.json").read_text())["format"] == "cloze"  # the resolved copy
    load_run(run_dir)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr="1e-3"), "`lr` to be a number"),
    (dict(max_steps=2.5), "`max_steps` to be an int"),
    (dict(seed="1"), "`seed` to be an int"),
    (dict(batch_size=True), "`batch_size` to be an int"),
    (dict(format="lettr"), r"one of \['letter', 'cloze', 'auto'\]"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(method_options=[1]), "method_options"),
])
def test_config_values_of_the_wrong_type_are_refused_by_name(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_method_options_of_the_wrong_type_are_refused_by_name():
    with pytest.raises(MethodError, match="`prior_std` to be a number.*'big'"):
        build_method("blob", {"prior_std": "big"})
    with pytest.raises(MethodError, match="`n_members` to be an int"):
        build_method("ens", {"n_members": 2.0})
    assert build_method("blob", {"prior_std": 1}).config.prior_std == 1  # an int is a number


def test_a_path_object_is_a_dataset(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(4)))
    config = TrainConfig(**{**TINY, "dataset": data}, max_steps=1)
    assert config.dataset == str(data)
    assert json.loads((train(config, tmp_path / "run", progress=False) / "run.json").read_text())["dataset"] == \
        str(data)


def test_questions_given_in_python_are_checked_like_a_data_file(mle_dir):
    run = load_run(mle_dir)
    with pytest.raises(DatasetError, match="Question 0: field 'choices' should be list"):
        run.predict([{"question": "q", "choices": "yes"}])
    with pytest.raises(DatasetError, match="a list of questions"):
        run.predict({"question": "q", "choices": ["a", "b"]})
    with pytest.raises(DatasetError, match="Question 1: answer 'Z' is neither"):
        run.predict([*Q, {**Q[0], "answer": "Z"}])
    assert run.predict([{**Q[0], "answer": "B"}]).probs.shape == (1, 3)
    labelled = [{**Q[0], "answer": 1}, {"question": "Pick", "choices": ["x", "y"], "answer": "x"}]
    metrics, pred = evaluate_examples(run, labelled)
    assert metrics["n"] == 2 and pred.probs.shape == (2, 3)
    with pytest.raises(DatasetError, match="missing field 'answer'"):
        evaluate_examples(run, Q)


@pytest.mark.parametrize("method", ["laplace", "tfb"])
def test_jacobian_predictives_work_under_inference_mode(mle_dir, tmp_path, method):
    """Laplace and TFB's linearized predictive differentiate the model; inside torch.inference_mode() they turn
    autograd back on for their own pass and give what torch.no_grad() gives."""
    out = bayesianize(mle_dir, method, tmp_path / method, limit=8, options={"n_val": 8})
    run = load_run(out)
    with torch.no_grad():
        plain = run.predict(Q).probs
    with torch.inference_mode():
        inside = run.predict(Q).probs
    assert torch.allclose(plain, inside)


def test_plots_leave_pyplot_alone_and_follow_the_suffix(tmp_path):
    code = (
        "import matplotlib; matplotlib.use('pdf'); import torch\n"
        "from bayeslora.plots import reliability_diagram\n"
        "p = torch.tensor([[0.7, 0.3], [0.2, 0.8]]); y = torch.tensor([0, 0])\n"
        f"reliability_diagram(p, y, r'{tmp_path / 'r.pdf'}'); reliability_diagram(p, y, r'{tmp_path / 'r.png'}')\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pdf"
    assert (tmp_path / "r.pdf").read_bytes()[:4] == b"%PDF" and (tmp_path / "r.png").read_bytes()[1:4] == b"PNG"
    from bayeslora.plots import reliability_diagram

    with pytest.raises(ValueError, match=r"ending in \.png, \.pdf, \.svg"):
        reliability_diagram(torch.tensor([[0.7, 0.3]]), torch.tensor([0]), tmp_path / "r.jpg")


def test_import_adds_no_process_wide_warning_filters():
    code = ("import warnings; before = list(warnings.filters); import bayeslora, bayeslora.peft_ext\n"
            "added = [f for f in warnings.filters if f not in before]\n"
            "print([str(f[1].pattern) for f in added if f[1] is not None and 'peft' in repr(f).lower() or "
            "(f[1] is not None and ('tie_word' in f[1].pattern or 'checkpointing' in f[1].pattern))])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_paths_and_devices_give_clear_errors(mle_dir):
    with pytest.raises(MethodError, match="is a file; expected a run directory"):
        load_run(mle_dir / "run.json")
    if not torch.cuda.is_available():
        from bayeslora.models import ModelLoadError

        with pytest.raises(ModelLoadError, match="no CUDA"):
            load_run(mle_dir, device="cuda")


def test_training_log_is_strict_json(tmp_path):
    from bayeslora.train import LOG_FILE, _log

    _log(tmp_path, {"step": 1, "eval": {"auroc_misclassification": float("nan")}})
    line = (tmp_path / LOG_FILE).read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) == \
        {"step": 1, "eval": {"auroc_misclassification": None}}
