"""Post-hoc pipeline (bayesianize / calibrate) and the temperature method, on the tiny random model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bayeslora.config import TrainConfig
from bayeslora.methods.temperature import fit_temperature
from bayeslora.models import load_model
from bayeslora.posthoc import PosthocError, bayesianize
from bayeslora.runs import load_run
from bayeslora.tasks import load_task
from bayeslora.train import train

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def mle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("posthoc") / "mle"
    config = TrainConfig(model=TINY, dataset="arith", max_steps=3, batch_size=4, train_limit=16, save_every=0)
    return train(config, out, progress=False)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A plain PEFT adapter directory, as another tool would save it."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY).model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


def _questions(n=6, split="validation"):
    return load_task("arith", split, limit=n)


def test_temperature_round_trip(mle_run, tmp_path):
    out = bayesianize(mle_run, "temperature", tmp_path / "t", limit=12)
    info = json.loads((out / "run.json").read_text())
    assert info["fit"]["split"] == "validation" and info["source"]["method"] == "mle"
    run = load_run(out)
    src = load_run(mle_run)
    pred, base = run.predict(_questions()), src.predict(_questions())
    t = info["fit"]["temperature"]
    logits = base.probs.log()
    torch.testing.assert_close(pred.probs, torch.softmax(logits / t, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.prediction, base.prediction)


def test_temperature_lowers_nll_of_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    clean = torch.randn(400, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    logits = 6.0 * clean  # overconfident by a factor 6
    t = fit_temperature(logits, labels)
    nll = lambda z: torch.nn.functional.cross_entropy(z, labels)  # noqa: E731
    assert t > 3.0 and nll(logits / t) < nll(logits) - 0.1


def test_plain_peft_adapter_input(peft_adapter, tmp_path):
    out = bayesianize(peft_adapter, "temperature", tmp_path / "t", dataset="arith", model=TINY, limit=8)
    run = load_run(out)
    assert run.info["source"]["kind"] == "peft" and run.info["adapter"]["r"] == 4
    probs = run.predict(_questions(3)).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_bad_inputs_write_nothing(mle_run, peft_adapter, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PosthocError, match="not a LoRA adapter"):
        bayesianize(tmp_path, "temperature", out, dataset="arith", model=TINY)
    with pytest.raises(PosthocError, match="pass --model"):
        bayesianize(peft_adapter, "temperature", out, dataset="arith")
    with pytest.raises(ValueError, match="empty"):
        bayesianize(mle_run, "temperature", out, limit=0)
    with pytest.raises(ValueError, match="trained end to end"):
        bayesianize(mle_run, "mle", out)
    # rank in the config does not match the saved weights
    bad = tmp_path / "bad_rank"
    shutil.copytree(peft_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(PosthocError, match="does not fit the base model"):
        bayesianize(bad, "temperature", out, dataset="arith", model=TINY, limit=4)
    # target modules the base model does not have
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    with pytest.raises(PosthocError, match="does not fit the base model"):
        bayesianize(bad, "temperature", out, dataset="arith", model=TINY, limit=4)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_calibrate_and_errors(mle_run, tmp_path, capsys):
    from bayeslora.cli import main

    assert main(["calibrate", str(mle_run), "--out", str(tmp_path / "c"), "--limit", "8"]) == 0
    assert (tmp_path / "c" / "posterior.safetensors").is_file()
    assert main(["bayesianize", str(tmp_path), "--method", "temperature", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
