"""The contract every registered method keeps (methods added later join automatically through ``METHODS``).

Post-hoc methods are ``fit`` on a few examples where others take a training step.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.methods import METHODS, AdapterConfig, MethodError, build_method
from bayeslora.models import load_model
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def examples():
    return load_task("arith", "train", limit=8)


def _setup(name: str, examples, seed: int = 0):
    torch.manual_seed(seed)  # PEFT's LoRA init uses the global RNG (as in the training loop)
    loaded = load_model(TINY)
    base_ids = {id(p): n for n, p in loaded.model.named_parameters()}
    method = build_method(name)
    model = method.prepare(loaded.model, AdapterConfig())
    scorer = make_scorer("cloze", loaded.tokenizer, max_length=64)
    return method, model, scorer, base_ids


def _step(method, model, scorer, examples) -> None:
    """One optimizer step (a post-hoc fit for post-hoc methods), so that the adapter is not at its init."""
    if method.posthoc:  # as bayesianize does: the tuning split (e.g. Laplace's val_nll prior) only where used
        extra = {"validation": load_task("arith", method.tune_split, limit=4)} if method.tune_split else {}
        method.fit(model, scorer, examples[:4], batch_size=4, generator=torch.Generator().manual_seed(0), **extra)
        return
    model.train()
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-2)
    enc = scorer.encode(examples[:4])
    loss = method.nll(model, scorer, enc, torch.Generator().manual_seed(0)) + method.kl_scale(100) * method.kl()
    loss.backward()
    optimizer.step()
    model.eval()


def _predict(method, model, scorer, examples, n_samples=None, seed=1):
    enc = scorer.encode(examples[4:8])
    return method.predict(model, scorer, enc, n_samples=n_samples, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_predict_is_a_distribution(name, examples):
    method, model, scorer, _ = _setup(name, examples)
    _step(method, model, scorer, examples)
    for n in (None, 0, 2):
        pred = _predict(method, model, scorer, examples, n_samples=n)
        assert pred.probs.shape == (4, 4)
        assert torch.allclose(pred.probs.sum(-1), torch.ones(4), atol=1e-5)
        assert torch.all(pred.epistemic >= 0) and torch.all(pred.aleatoric >= 0)
        if pred.sample_probs is not None:
            assert pred.sample_probs.shape[1:] == (4, 4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kl_is_finite_and_nonnegative(name, examples):
    method, model, scorer, _ = _setup(name, examples)
    kl = method.kl()
    assert kl.dim() == 0 and math.isfinite(kl.item()) and kl.item() >= 0
    assert method.kl_scale(100) >= 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_changes_only_adapter_and_posterior(name, examples):
    method, model, scorer, base_ids = _setup(name, examples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(method, model, scorer, examples)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    base_changed = [n for n, p in model.named_parameters() if id(p) in base_ids and n in changed]
    assert not base_changed, f"{name} changed base-model parameters: {base_changed[:3]}"
    if not method.posthoc:
        assert changed, f"{name}: a training step changed nothing"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_round_trip(name, examples, tmp_path):
    method, model, scorer, _ = _setup(name, examples)
    _step(method, model, scorer, examples)
    expected = _predict(method, model, scorer, examples)
    method.save(model, tmp_path)
    again = build_method(name, method.config.to_dict())
    loaded = again.load(load_model(TINY).model, tmp_path)
    loaded.eval()
    got = _predict(again, loaded, scorer, examples)
    assert torch.equal(expected.probs, got.probs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loading_another_methods_run_is_an_error(name, examples, tmp_path):
    method, model, scorer, _ = _setup(name, examples)
    method.save(model, tmp_path)
    other = "blob" if name == "mle" else "mle"
    with pytest.raises(MethodError):
        build_method(other).load(load_model(TINY).model, tmp_path)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_negative_samples_is_an_error(name, examples):
    method, model, scorer, _ = _setup(name, examples)
    with pytest.raises(MethodError, match="n_samples"):
        _predict(method, model, scorer, examples, n_samples=-1)
    with pytest.raises(MethodError, match="n_samples"):
        build_method(name, {"n_samples": -3})


def test_unknown_method_is_an_error():
    with pytest.raises(MethodError, match="Unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(MethodError, match="Unknown option"):
        build_method("blob", {"no_such_option": 1})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_damaged_adapter_is_refused_on_load(name, examples, tmp_path):
    """PEFT only warns about adapter weights it does not find and keeps their random initial values: a saved
    adapter that lost a tensor (or is not LoRA) must not evaluate as if it were the trained one."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    method, model, scorer, _ = _setup(name, examples)
    method.save(model, tmp_path / "run")
    members = sorted((tmp_path / "run" / "adapter").glob("**/adapter_model.safetensors"))
    for weights in members:  # the ensemble's members too
        damaged = tmp_path / f"damaged-{weights.parent.name}"
        shutil.copytree(tmp_path / "run", damaged)
        path = damaged / weights.relative_to(tmp_path / "run")
        state = load_file(str(path))
        state.pop(sorted(k for k in state if ".lora_A" in k)[0])
        save_file(state, str(path))
        with pytest.raises(MethodError, match="is not usable: its LoRA weights do not match.*1 missing"):
            build_method(name, method.config.to_dict()).load(load_model(TINY).model, damaged)
    foreign = tmp_path / "ia3"
    shutil.copytree(tmp_path / "run", foreign)
    config = json.loads((foreign / "adapter" / "adapter_config.json").read_text())
    (foreign / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(MethodError, match="holds a 'IA3' adapter, not LoRA"):
        build_method(name, method.config.to_dict()).load(load_model(TINY).model, foreign)


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if not getattr(cls, "posthoc", False)))
def test_plain_peft_loads_the_posterior_mean(name, examples, tmp_path):
    """README: `PeftModel.from_pretrained(base, RUN/adapter)` gives the method's deterministic predictive
    (``--samples 0``). sgp used to save its generated factors' unused initial weights there."""
    from peft import PeftModel

    method, model, scorer, _ = _setup(name, examples)
    _step(method, model, scorer, examples)
    _step(method, model, scorer, examples)  # trained factors away from their initial values
    expected = _predict(method, model, scorer, examples, n_samples=0).probs
    method.save(model, tmp_path)
    plain = PeftModel.from_pretrained(load_model(TINY).model, str(tmp_path / "adapter"))
    plain.eval()
    with torch.no_grad():
        got = torch.softmax(scorer.choice_logits(plain, scorer.encode(examples[4:8])).float(), -1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
