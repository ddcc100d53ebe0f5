"""Post-hoc pipeline (bayesianize / calibrate) and the temperature method, on the tiny random model."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from bayeslora.config import TrainConfig
from bayeslora.methods.linearized import meanfield_probs, probit_probs
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


@pytest.mark.parametrize("informative, bound", [(False, "e^6"), (True, "e^-6")])
def test_temperature_at_its_limit_is_said(monkeypatch, informative, bound):
    """T is clamped to [e^-6, e^6]; a fit that stops there says so (run.json and a warning) instead of silently."""
    from bayeslora.methods import temperature

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (50,), generator=g)
    logits = -5.0 * torch.nn.functional.one_hot(labels, 4).float()  # wrong everywhere: the NLL falls as T grows
    monkeypatch.setattr(temperature, "collect_logits", lambda *a: (logits, labels))
    if informative:  # separable logits: T -> 0, though L-BFGS stops early once the NLL is flat at 0
        monkeypatch.setattr(temperature, "fit_temperature", lambda *a: math.exp(-6.0))
    with pytest.warns(UserWarning, match="T stopped at the limit " + re.escape(bound)):
        info = temperature.Temperature().fit(None, None, [])
    assert info["temperature"] == pytest.approx(math.exp(6.0 if not informative else -6.0))
    assert "50 questions" in info["note"]
    clean = 2.0 * torch.randn(50, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 4)
    monkeypatch.undo()
    monkeypatch.setattr(temperature, "collect_logits", lambda *a: (clean, labels))
    assert "note" not in temperature.Temperature().fit(None, None, [])


def test_plain_peft_adapter_input(peft_adapter, tmp_path):
    out = bayesianize(peft_adapter, "temperature", tmp_path / "t", dataset="arith", model=TINY, limit=8)
    run = load_run(out)
    assert run.info["source"]["kind"] == "peft" and run.info["adapter"]["r"] == 4
    probs = run.predict(_questions(3)).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    # the choice limits of a data file and of /v1/choices
    with pytest.raises(ValueError, match="Question 0: expected 2 to 10 choices"):
        run.predict([{"question": "q", "choices": ["only"]}])
    with pytest.raises(ValueError, match="Question 0: expected 2 to 10 choices"):
        run.predict([{"question": "q", "choices": [str(i) for i in range(11)]}])


def test_bad_inputs_write_nothing(mle_run, peft_adapter, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PosthocError, match="not a LoRA adapter"):
        bayesianize(tmp_path, "temperature", out, dataset="arith", model=TINY)
    with pytest.raises(PosthocError, match="pass --model"):
        bayesianize(peft_adapter, "temperature", out, dataset="arith")
    with pytest.raises(ValueError, match="`limit` to be a positive int"):
        bayesianize(mle_run, "temperature", out, limit=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no examples found"):
        bayesianize(mle_run, "temperature", out, dataset=str(empty))
    with pytest.raises(ValueError, match="trained end to end"):
        bayesianize(mle_run, "mle", out)
    # rank in the config does not match the saved weights
    bad = tmp_path / "bad_rank"
    shutil.copytree(peft_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(PosthocError, match="does not fit the base model") as err:
        bayesianize(bad, "temperature", out, dataset="arith", model=TINY, limit=4)
    assert "\n" not in str(err.value) and "more lines" in str(err.value)  # PEFT lists every tensor
    # a LoRA variant
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PosthocError, match="LoRA variant \\(use_dora"):
        bayesianize(bad, "temperature", out, dataset="arith", model=TINY, limit=4)
    # target modules the base model does not have
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    with pytest.raises(PosthocError, match="does not fit the base model"):
        bayesianize(bad, "temperature", out, dataset="arith", model=TINY, limit=4)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_calibrate_and_errors(mle_run, tmp_path, capsys):
    from bayeslora.cli import main

    assert main(["calibrate", str(mle_run), "--out", str(tmp_path / "c"), "--limit", "8", "--no-progress"]) == 0
    assert (tmp_path / "c" / "posterior.safetensors").is_file()
    assert "logits" not in capsys.readouterr().err
    assert main(["bayesianize", str(tmp_path), "--method", "temperature", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_fit_passes_show_progress_bars_unless_turned_off(mle_run, tmp_path, capsys):
    """A Laplace fit on the CPU runs for minutes: the CLI shows a bar per pass (curvature, then the Jacobians
    of the prior's validation questions); the library stays quiet unless asked."""
    from bayeslora.cli import main

    options = {"n_fit": 8, "n_val": 8}
    bayesianize(mle_run, "laplace", tmp_path / "quiet", options=options, limit=8)
    assert capsys.readouterr().err == ""
    assert main(["bayesianize", str(mle_run), "--method", "laplace", "--out", str(tmp_path / "cli"), "--limit", "8",
                 "--option", "n_fit=8", "--option", "n_val=8"]) == 0
    err = capsys.readouterr().err
    assert "curvature" in err and "prior (Jacobians)" in err
    assert main(["bayesianize", str(mle_run), "--method", "laplace", "--out", str(tmp_path / "off"), "--limit", "8",
                 "--option", "n_fit=8", "--option", "n_val=8", "--no-progress"]) == 0
    assert "curvature" not in capsys.readouterr().err


def _fit_in_memory(method_name, options, source, tmp_path, split="train", n=12):
    """Fit ``method_name`` on the adapter of ``source`` in memory, save it, reload it; return both runs."""
    from bayeslora.methods import build_method
    from bayeslora.posthoc import load_adapter, resolve_source
    from bayeslora.runs import Run
    from bayeslora.scoring import make_scorer

    src = resolve_source(source)
    loaded = load_model(TINY)
    model = load_adapter(loaded.model, src.adapter_dir)
    scorer = make_scorer(src.format, loaded.tokenizer)
    method = build_method(method_name, options)
    generator = torch.Generator().manual_seed(0)  # bayesianize's default seed
    extra = {"validation": load_task("arith", method.tune_split)} if method.tune_split else {}  # as bayesianize
    method.fit(model, scorer, load_task("arith", split, limit=n), batch_size=8, generator=generator, **extra)
    mem = Run(model=model, tokenizer=loaded.tokenizer, method=method, scorer=scorer)
    out = bayesianize(source, method_name, tmp_path / method_name, split=split, options=options, limit=n)
    return mem, load_run(out)


# the paper's rule and predictive (the defaults are fit=val_nll, predictive=glm), cut down for the tiny model
TFB_FAST = {"fit": "anchor", "predictive": "mc", "n_anchor": 8, "search_samples": 2, "search_steps": 3, "n_samples": 3}


def test_tfb_svd_reparameterization_preserves_product():
    from bayeslora.methods.tfb import svd_reparameterize

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g)
    A2, B2, d = svd_reparameterize(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B2.norm(dim=0), d)  # B' = U diag(d): column norms are the singular values
    assert torch.all(d[:-1] >= d[1:])


def test_tfb_round_trip_and_mean(mle_run, tmp_path):
    mem, run = _fit_in_memory("tfb", TFB_FAST, mle_run, tmp_path)
    assert run.info["fit"]["sigma"] > 0
    qs = _questions(5)
    a, b = mem.predict(qs, seed=3), run.predict(qs, seed=3)
    assert a.sample_probs.shape == (3, 5, 4)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, atol=1e-5, rtol=1e-4)
    assert b.epistemic.max() > 0
    # the posterior mean is the source adapter itself (B' A' = B A)
    torch.testing.assert_close(run.predict(qs, n_samples=0).probs, load_run(mle_run).predict(qs).probs,
                               atol=1e-5, rtol=1e-4)


def test_antithetic_noise_mirrors_the_first_half():
    from bayeslora.peft_ext.stochastic import SamplingState

    state = SamplingState(groups=torch.arange(6), n_groups=6, generator=torch.Generator().manual_seed(0),
                          antithetic=True)
    eps = state.noise(object(), (2, 3), "cpu", torch.float32)
    torch.testing.assert_close(eps[3:], -eps[:3])
    assert eps[:3].abs().min() > 0


@pytest.mark.parametrize("c,power", [(1e4, 2.0), (30.0, 2.0), (5.0, 1.0), (1e7, 3.0)])
def test_tfb_secant_search_finds_the_largest_sigma_in_few_evaluations(c, power):
    """On a change that follows c * sigma^power, the secant search lands within 1.2x of the exact answer (the
    resolution of 6 bisection steps), never above tau, in fewer evaluations than the bisection."""
    from bayeslora.methods import build_method

    results = {}
    for search in ("secant", "bisect"):
        method = build_method("tfb", {"search": search, "search_steps": 6})
        calls = []

        def change(sigma, calls=calls):
            calls.append(sigma)
            return c * sigma ** power

        results[search] = (method._secant if search == "secant" else method._bisect)(change), len(calls)
    exact = (0.003 / c) ** (1 / power)
    (sigma, n_secant), (sigma_b, n_bisect) = results["secant"], results["bisect"]
    assert c * sigma ** power <= 0.003 and exact / 1.2 <= sigma <= exact
    assert exact / 1.25 <= sigma_b <= exact
    assert n_secant <= 4 < n_bisect


def test_tfb_search_edges():
    from bayeslora.methods import build_method

    method = build_method("tfb", {"search_steps": 6})
    assert method._secant(lambda s: 0.0) == 1.0  # no change at all: sigma_max
    assert method._secant(lambda s: 1.0) == 0.0  # too much change everywhere: no noise
    with pytest.raises(ValueError, match="search"):
        build_method("tfb", {"search": "golden"})


def test_tfb_per_anchor_tolerance_allows_n_anchor_times_the_change(mle_run, tmp_path):
    """The reference code's rule divides the relative change by the anchor count: a larger sigma, whose anchor NLL
    changes by up to tau * n_anchor."""
    fits = {}
    for tolerance in ("relative", "per-anchor"):
        _, run = _fit_in_memory("tfb", {**TFB_FAST, "tolerance": tolerance}, mle_run, tmp_path / tolerance)
        fits[tolerance] = run.info["fit"]
    rel, per = fits["relative"], fits["per-anchor"]
    assert rel["allowed_change"] == 0.003 and per["allowed_change"] == pytest.approx(0.003 * per["n_anchor"])
    assert per["sigma"] > rel["sigma"] > 0
    change = abs(per["anchor_nll"] - per["anchor_nll0"]) / per["anchor_nll0"]
    assert 0.003 < change <= per["allowed_change"]
    from bayeslora.methods import build_method

    with pytest.raises(ValueError, match="tolerance"):
        build_method("tfb", {"tolerance": "absolute"})


@pytest.mark.parametrize("best", [0.02, 3e-4, 0.5])
def test_tfb_val_nll_scan_finds_the_minimum(best):
    """fit=val_nll: half-decade steps up from 1e-3 until the NLL rises, one parabolic step; on a parabola in
    log sigma it lands on the minimum (clamped to the scan's first sigma when the minimum lies below it)."""
    from bayeslora.methods import build_method

    method = build_method("tfb", {"fit": "val_nll", "search_steps": 6})
    calls = []

    def evaluate(sigma):
        calls.append(sigma)
        return 1.0 - 0.1 + 0.01 * (math.log(sigma) - math.log(best)) ** 2, 0.5

    sigma, value, acc, n = method._scan_min(evaluate, 1.0, 0.5)
    assert n == len(calls) <= 8 and value == evaluate(sigma)[0] < 1.0 and acc == 0.5
    assert sigma == pytest.approx(max(best, 1e-3), rel=0.05)


def test_tfb_val_nll_scan_edges_and_accuracy_limit():
    from bayeslora.methods import build_method

    method = build_method("tfb", {"fit": "val_nll", "search_steps": 6})
    assert method._scan_min(lambda s: (1.0 + s, 0.5), 1.0, 0.5) == (0.0, 1.0, 0.5, 2)  # noise hurts: the adapter
    sigma, value, _, n = method._scan_min(lambda s: (1.0 - s, 0.5), 1.0, 0.5)  # noise helps up to sigma_max
    assert sigma == 1.0 and value == 0.0 and n == 7  # 1e-3 * 10^(k/2), k = 0..6 (the last one the cap)
    # NLL keeps falling but the answers go: the largest sigma within 1 point of the adapter's accuracy, no further
    sigma, value, acc, n = method._scan_min(lambda s: (1.0 - s, 0.5 if s < 0.05 else 0.3), 1.0, 0.5)
    assert sigma == pytest.approx(0.0316, rel=1e-3) and acc == 0.5 and n == 5
    unlimited = build_method("tfb", {"fit": "val_nll", "search_steps": 6, "max_acc_drop": 1.0})
    assert unlimited._scan_min(lambda s: (1.0 - s, 0.5 if s < 0.05 else 0.3), 1.0, 0.5)[0] == 1.0
    for bad, match in (({"fit": "val"}, "fit"), ({"fit": "val_nll", "search_samples": 3}, "even"),
                       ({"max_acc_drop": 2.0}, "max_acc_drop")):
        with pytest.raises(ValueError, match=match):
            build_method("tfb", bad)


def test_tfb_val_nll_fit_tunes_sigma_on_validation(mle_run, tmp_path):
    """fit=val_nll reads the validation split (true labels; its n_val questions are not cut to the fit split's
    --limit), never raises the validation NLL above the adapter's, and saves a run that reloads to the same
    predictions; without validation examples it is a clear error."""
    options = {**TFB_FAST, "fit": "val_nll", "sigma_max": 10.0, "n_val": 16}
    mem, run = _fit_in_memory("tfb", options, mle_run, tmp_path)  # limit 12
    fit = run.info["fit"]
    assert mem.method.tune_split == fit["tune_split"] == "validation" and fit["n_val"] == 16
    assert fit["val_nll"] <= fit["val_nll0"] and 2 <= fit["n_evaluations"] <= 5
    assert fit["val_acc"] >= fit["val_acc0"] - 0.01
    qs = _questions(5)
    torch.testing.assert_close(mem.predict(qs, seed=3).probs, run.predict(qs, seed=3).probs, atol=1e-5, rtol=1e-4)
    from bayeslora.methods import MethodError, build_method

    model, scorer = _adapter_model(mle_run)
    with pytest.raises(MethodError, match="validation"):
        build_method("tfb", options).fit(model, scorer, _questions(4, "train"), validation=[])


def test_tfb_antithetic_predictive(mle_run, tmp_path, capsys):
    """predictive=antithetic: S / 2 mirrored pairs around the adapter; an odd S is refused; it is a prediction
    option, so `bayeslora eval --option predictive=antithetic` applies it to a saved run."""
    from bayeslora.cli import main
    from bayeslora.methods import MethodError

    mem, run = _fit_in_memory("tfb", {**TFB_FAST, "predictive": "antithetic", "n_samples": 4}, mle_run, tmp_path)
    qs = _questions(5)
    pred = run.predict(qs, seed=3)
    assert pred.sample_probs.shape == (4, 5, 4) and pred.epistemic.max() > 0
    torch.testing.assert_close(pred.probs, mem.predict(qs, seed=3).probs, atol=1e-5, rtol=1e-4)
    with pytest.raises(MethodError, match="even"):
        run.predict(qs, n_samples=3)
    with pytest.raises(ValueError, match="predictive"):
        from bayeslora.methods import build_method

        build_method("tfb", {"predictive": "head"})
    out = tmp_path / "tfb"
    assert main(["eval", str(out), "--limit", "4", "--samples", "2", "--option", "predictive=antithetic"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 4


def _to_first_choice(C: int) -> torch.Tensor:
    """``D (C, C)``: ``D f`` is ``f_c - f_0`` per choice (row 0 zero)."""
    D = torch.eye(C, dtype=torch.float64)
    D[:, 0] -= 1.0
    return D


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_tfb_glm_covariance_matches_dense_jacobian(mle_run, tmp_path, subset):
    """predictive=glm: the logit covariance is J diag(std^2) J^T over the Gaussian A' factors (dense brute force
    by autograd, on the shared-prefix layout), its mean is the adapter's own logits, and n_samples=0 is the adapter."""
    from bayeslora.peft_ext import stochastic_layers

    options = {**TFB_FAST, "predictive": "glm", "fit": "val_nll", "sigma_max": 10.0, "subset": subset}
    mem, _ = _fit_in_memory("tfb", options, mle_run, tmp_path)
    model, scorer, method = mem.model, mem.scorer, mem.method
    enc = scorer.encode(_questions(3), n_choices=4)
    assert enc.shared_prefix
    mean, cov = method._glm_cov(model, scorer, enc)
    layers = stochastic_layers(model)
    assert (len(layers) == 1) == (subset == "last_layer")
    params = [m.weight for m in layers]
    for p in params:
        p.requires_grad_(True)
    logits = scorer.choice_logits(model, enc)
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[b, c], params, retain_graph=True)])
                     for b in range(3) for c in range(4)]).double().view(3, 4, -1)  # (B, C, P)
    var = torch.cat([m.std().detach().expand_as(m.weight).flatten() for m in layers]).double() ** 2
    full = (J * var) @ J.transpose(1, 2)
    D = _to_first_choice(4)  # the Jacobians are of f_c - f_0: one backward fewer, the same var(f_i - f_j)
    torch.testing.assert_close(cov, D @ full @ D.T, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(meanfield_probs(mean, cov), meanfield_probs(mean, full.float()), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean, logits.detach(), atol=1e-5, rtol=1e-5)
    pred = method.predict(model, scorer, enc, generator=torch.Generator().manual_seed(0))
    assert pred.sample_probs.shape == (3, 3, 4) and pred.epistemic.min() >= -1e-6
    torch.testing.assert_close(method.predict(model, scorer, enc, n_samples=0).probs, logits.detach().softmax(-1))


def test_tfb_glm_fit_rules_round_trip_and_eval_option(mle_run, tmp_path, capsys):
    """predictive=glm fits sigma in closed form with either rule (anchor: the change stays within tau; val_nll: never
    above the adapter's NLL, accuracy within the limit, and a sigma > 0 where the adapter is confidently wrong),
    reloads to the same predictions, and, as a prediction option, applies to a run fitted with weight samples;
    prompt=mean is refused with it."""
    import dataclasses

    from bayeslora.cli import main
    from bayeslora.methods import MethodError, build_method

    glm = {**TFB_FAST, "predictive": "glm", "sigma_max": 10.0}
    for fit, kind in (("anchor", "anchor"), ("val_nll", "val")):
        mem, run = _fit_in_memory("tfb", {**glm, "fit": fit}, mle_run, tmp_path / fit)
        info = run.info["fit"]
        assert info["predictive"] == "glm" and info["n_evaluations"] == 1
        if fit == "anchor":
            tau = build_method("tfb").config.tau  # TFB_FAST keeps the default tolerance
            assert info["sigma"] > 0 and abs(info["anchor_nll"] - info["anchor_nll0"]) <= tau * info["anchor_nll0"]
            assert info["n_anchor"] == 8 and info["n_grid"] > 1
        else:  # on random validation questions the tiny adapter may be calibrated already: sigma 0 is allowed
            assert info[f"{kind}_nll"] <= info[f"{kind}_nll0"] and info["val_acc"] >= info["val_acc0"] - 0.01
        qs = _questions(5)
        torch.testing.assert_close(mem.predict(qs, seed=3).probs, run.predict(qs, seed=3).probs, atol=1e-5,
                                   rtol=1e-4)
        assert ("note" in info) == (info["sigma"] >= glm["sigma_max"] * (1 - 1e-9))  # only a capped sigma
    model, scorer = _adapter_model(mle_run)
    # validation questions relabelled to the adapter's least likely choice: any spread lowers their NLL
    val = _questions(16, "validation")
    with torch.no_grad():
        worst = scorer.choice_logits(model, scorer.encode(val)).argmin(-1).tolist()
    wrong = [dataclasses.replace(ex, label=w) for ex, w in zip(val, worst, strict=True)]
    fit = build_method("tfb", {**glm, "fit": "val_nll"}).fit(model, scorer, _questions(8, "train"), validation=wrong)
    assert fit["sigma"] > 0 and fit["val_nll"] < fit["val_nll0"]
    # a sigma range whose every sigma passes: the fit says it is capped
    capped = build_method("tfb", {**glm, "sigma_max": 1e-4}).fit(model, scorer, _questions(8, "train"))
    assert capped["sigma"] == pytest.approx(1e-4) and "sigma_max" in capped["note"]
    _fit_in_memory("tfb", TFB_FAST, mle_run, tmp_path / "mc")
    assert main(["eval", str(tmp_path / "mc" / "tfb"), "--limit", "4", "--option", "predictive=glm"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 4
    with pytest.raises(MethodError, match="prompt=mean"):
        build_method("tfb", {"predictive": "glm", "prompt": "mean"})


def test_tfb_glm_generation_decodes_the_linearized_model(mle_run, tmp_path):
    """predictive=glm in generation: S/2 mirrored pairs and the adapter itself as S + 1 rows of one forward (the last
    row without noise), whose logits become ``f(mean) +- central difference``: the even-order shift of the weight
    samples is dropped, so the samples' mean logits are the adapter's; the tokens are the adapter's own (greedy: the
    deterministic decode's), the uncertainty the samples'. An odd S is refused for generation only."""
    from bayeslora.methods import MethodError
    from bayeslora.peft_ext import sample_groups, stochastic_layers
    from bayeslora.serve.generation import DecodeParams, decode, linearized_logits, step_stats

    # central differences remove any even part exactly: rows f0 + odd_i + even_i and f0 - odd_i + even_i
    f0, odd, even = torch.randn(1, 7), torch.randn(2, 7), torch.randn(2, 7)
    rows = torch.cat([f0 + odd + even, f0 - odd + even, f0])
    torch.testing.assert_close(linearized_logits(rows), torch.cat([f0 + odd, f0 - odd]))

    _, run = _fit_in_memory("tfb", {**TFB_FAST, "predictive": "glm", "sigma_max": 10.0}, mle_run, tmp_path)
    model, method = run.model, run.method
    assert run.info["fit"]["sigma"] > 0 and method.config.sample_plan().linearized
    with sample_groups(model, None, n_groups=5, generator=torch.Generator().manual_seed(0), antithetic=True,
                       center=True) as state:
        layer = stochastic_layers(model)[0]
        eps = state.noise(layer, tuple(layer.weight.shape), "cpu", torch.float32)
    assert eps.shape[0] == 5
    torch.testing.assert_close(eps[2:4], -eps[:2])
    assert eps[4].abs().max() == 0 and eps[:2].abs().min() > 0

    prompt = [5, 6, 7]
    steps = list(decode(model, method, prompt, DecodeParams(max_tokens=3, temperature=0.0, n_samples=4),
                        torch.Generator().manual_seed(0)))
    assert len(steps) == 3 and max(s.epistemic for s in steps) > 0
    plain_steps = list(decode(model, method, prompt, DecodeParams(max_tokens=3, temperature=0.0, n_samples=1), None))
    assert [s.token_id for s in steps] == [s.token_id for s in plain_steps]
    # the first step by hand: the same draws, the linearized samples, their mean logits = the adapter's
    ids = torch.tensor([prompt] * 5)
    with torch.no_grad():
        plain = model(input_ids=ids[:1]).logits[:, -1]
        with method.sampling(model, None, n_groups=5, generator=torch.Generator().manual_seed(0), antithetic=True,
                             center=True):
            logits = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits[4:], plain, atol=1e-5, rtol=1e-5)
    assert (logits[0] - plain[0]).abs().max() > 1e-4  # the pairs are perturbed
    samples = linearized_logits(logits)
    torch.testing.assert_close(samples.mean(0, keepdim=True), plain, atol=1e-5, rtol=1e-5)
    probs, total, aleatoric, epistemic = step_stats(samples)
    assert steps[0].token_id == int(plain.argmax())
    assert steps[0].logprob == pytest.approx(math.log(probs[steps[0].token_id]), rel=1e-4)  # under the mixture
    assert steps[0].entropy == pytest.approx(total, rel=1e-4) and steps[0].epistemic == pytest.approx(
        epistemic, rel=1e-3, abs=1e-7)
    method.config.sample_plan().check(3)  # the choice predictive takes any S
    with pytest.raises(MethodError, match="even"):
        method.config.sample_plan().check(3, generation=True)


def test_tfb_last_layer_samples_the_lm_head_alone(mle_run, peft_adapter, tmp_path):
    """subset=last_layer: only the LM head's A is Gaussian; its samples are exact (one trunk forward, then the head:
    the same logits as a whole forward with that weight sample); the search's cached head inputs give the NLL of
    the head predictive; the run reloads to the same predictions, keeps the adapter as its mean, and decodes."""
    from bayeslora.methods import MethodError, build_method
    from bayeslora.methods.head import gaussian_head, head_logits, head_noise, head_sample_logits
    from bayeslora.peft_ext import stochastic_layers
    from bayeslora.serve.generation import DecodeParams, decode

    opts = {**TFB_FAST, "subset": "last_layer", "predictive": "antithetic", "n_samples": 4, "sigma_max": 10.0}
    mem, run = _fit_in_memory("tfb", opts, mle_run, tmp_path)
    head = gaussian_head(run.model)
    assert run.info["fit"]["sigma"] > 0 and stochastic_layers(run.model) == [head.lora_A]
    qs = _questions(5)
    a, b = mem.predict(qs, seed=3), run.predict(qs, seed=3)
    assert b.sample_probs.shape == (4, 5, 4) and b.epistemic.max() > 0
    torch.testing.assert_close(a.sample_probs, b.sample_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run.predict(qs, n_samples=0).probs, load_run(mle_run).predict(qs).probs,
                               atol=1e-5, rtol=1e-4)
    enc = run.scorer.encode(qs)
    with torch.no_grad():
        noise = head_noise(head, 4, torch.Generator().manual_seed(0), antithetic=True)
        torch.testing.assert_close(noise[2:], -noise[:2])
        fast = head_logits(head, run.scorer, enc, *run.scorer.forward_vocab(run.model, enc, capture=head.layer),
                           noise)
        mean_A = head.lora_A.weight.data.clone()
        for s in range(4):  # the same weight sample through a whole (deterministic) forward
            head.lora_A.weight.data.copy_(mean_A + noise[s])
            torch.testing.assert_close(fast[s], run.scorer.choice_logits(run.model, enc), atol=1e-4, rtol=1e-4)
        head.lora_A.weight.data.copy_(mean_A)
        # the search's cached inputs: the NLL of the head predictive drawn with the same seed
        heads = run.method._head_inputs(run.model, run.scorer, [enc])
        nll, _ = run.method._labels_nll(run.model, run.scorer, [enc], [enc.labels], 4, 7, True, heads)
        probs = head_sample_logits(run.model, run.scorer, enc, 4, torch.Generator().manual_seed(7), True).softmax(-1)
        assert nll == pytest.approx(-probs.mean(0).gather(1, enc.labels[:, None]).log().mean().item(), rel=1e-5)
    steps = list(decode(run.model, run.method, [5, 6, 7], DecodeParams(max_tokens=3, n_samples=4),
                        torch.Generator().manual_seed(0)))
    assert len(steps) == 3 and max(s.epistemic for s in steps) > 0
    with pytest.raises(MethodError, match="subset"):
        build_method("tfb", {"subset": "middle"})
    with pytest.raises(MethodError, match="prompt=mean"):
        build_method("tfb", {"subset": "last_layer", "predictive": "mc", "prompt": "mean"})
    from bayeslora.posthoc import load_adapter

    loaded = load_model(TINY)
    model = load_adapter(loaded.model, peft_adapter)  # q_proj and v_proj only: no LM head to cover
    with pytest.raises(MethodError, match="LM head"):
        build_method("tfb", opts).fit(model, run.scorer, _questions(4, "train"))


def test_tfb_bisect_fit(mle_run, tmp_path):
    _, run = _fit_in_memory("tfb", {**TFB_FAST, "search": "bisect"}, mle_run, tmp_path)
    assert run.info["fit"]["n_evaluations"] == 2 + 3


def _adapter_model(source):
    from bayeslora.posthoc import load_adapter, resolve_source
    from bayeslora.scoring import make_scorer

    src = resolve_source(source)
    loaded = load_model(TINY)
    return load_adapter(loaded.model, src.adapter_dir), make_scorer(src.format, loaded.tokenizer)


def _fitted_laplace(source, **options):
    from bayeslora.methods import build_method

    model, scorer = _adapter_model(source)
    method = build_method("laplace", {"n_fit": 12, **options})
    method.fit(model, scorer, load_task("arith", "train", limit=40), batch_size=4,
               generator=torch.Generator().manual_seed(0), validation=load_task("arith", "validation", limit=8))
    return method, model, scorer


def test_laplace_round_trip(mle_run, tmp_path):
    options = {"n_fit": 12, "n_samples": 5}
    mem, run = _fit_in_memory("laplace", options, mle_run, tmp_path, n=40)
    qs = _questions(5)
    a, b = mem.predict(qs, seed=3), run.predict(qs, seed=3)
    assert a.sample_probs.shape == (5, 5, 4)
    torch.testing.assert_close(a.sample_probs, b.sample_probs, atol=1e-4, rtol=1e-3)
    assert run.info["fit"]["prior_precision"] == mem.method.prior_precision


@pytest.mark.parametrize("edit, problem", [
    (lambda st: st.update(n_data=torch.tensor([-1e6])), "`n_data` should be one finite positive number"),
    (lambda st: st.update(n_data=torch.tensor([0.0])), "`n_data` should be one finite positive number"),
    (lambda st: st.update(prior_precision=torch.tensor([1.0, 2.0])), "`prior_precision` should be one finite"),
    (lambda st: [st.__setitem__(k, -st[k].abs() - 1) for k in list(st) if k.endswith(".la")],
     "negative eigenvalues"),
    (lambda st: [st.__setitem__(k, torch.full_like(st[k], float("nan"))) for k in list(st) if k.endswith(".qg")],
     "non-finite values"),
])
def test_a_corrupted_laplace_posterior_is_refused(mle_run, tmp_path, edit, problem):
    """A hand-edited curvature or prior loaded without a word would give other uncertainties than the fit's."""
    from safetensors.torch import load_file, save_file

    from bayeslora.methods import MethodError

    out = bayesianize(mle_run, "laplace", tmp_path / "lap", options={"n_fit": 8, "prior": "marglik"}, limit=8)
    state = load_file(str(out / "posterior.safetensors"))
    edit(state)
    save_file(state, str(out / "posterior.safetensors"), metadata={"method": "laplace"})
    with pytest.raises(MethodError, match=re.escape(problem)):
        load_run(out)


def test_batches_are_scored_with_their_own_choice_count(mle_run):
    """Evaluation scores each batch with its own largest choice count (a Jacobian pays one backward per choice)
    and pads the rest with probability 0: the same predictive as scoring every batch with the largest count."""
    import dataclasses

    from bayeslora.evaluate import predict_examples
    from bayeslora.predictive import Predictive
    from bayeslora.runs import Run

    method, model, scorer = _fitted_laplace(mle_run, prior_precision=1.0, n_samples=0)
    run = Run(model=model, tokenizer=scorer.tokenizer, method=method, scorer=scorer)
    qs = _questions(6)
    # the first batch has three choices per question, the second four
    three = [dataclasses.replace(q, choices=q.choices[:3], cloze=q.cloze[:3], label=min(q.label, 2)) for q in qs[:3]]
    qs = three + qs[3:]
    counts = []
    encode = scorer.encode
    scorer.encode = lambda chunk, n_choices=None: counts.append(encode(chunk, n_choices).choice_mask.shape[1]) or \
        encode(chunk, n_choices)
    try:
        pred = predict_examples(run, qs, batch_size=3)
    finally:
        del scorer.encode
    assert counts == [3, 4]
    padded = Predictive.cat([method.predict(model, scorer, scorer.encode(qs[i:i + 3], n_choices=4), n_samples=0)
                             for i in (0, 3)])
    assert pred.probs.shape == (6, 4) and (pred.probs[:3, 3] == 0).all()
    torch.testing.assert_close(pred.probs, padded.probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("subset", ["last_layer", "all"])
def test_laplace_covariance_matches_dense_computation(mle_run, subset):
    """Hook-based Jacobians (on the shared-prefix layout: the trunk's LoRA sees the context and the choices in two
    forwards) and the low-rank KFAC covariance equal a dense brute force."""
    method, model, scorer = _fitted_laplace(mle_run, subset=subset)
    if subset == "last_layer":
        assert all(k.endswith(("lm_head.lora_A", "lm_head.lora_B")) for k in method.factors)
    else:
        assert any("q_proj" in k for k in method.factors)
    enc = scorer.encode(_questions(3), n_choices=4)
    assert enc.shared_prefix
    mean, feats, gram = method._jacobian_features(model, scorer, enc)
    params = [f.module.weight for f in method.factors.values()]
    for p in params:
        p.requires_grad_(True)
    logits = scorer.choice_logits(model, enc)
    J = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[b, c], params, retain_graph=True)])
                     for b in range(3) for c in range(4)]).double().view(3, 4, -1)  # (B, C, P)
    torch.testing.assert_close(sum(gram.values()), J @ J.transpose(1, 2), atol=1e-6, rtol=1e-4)
    blocks = []
    for f in method.factors.values():
        qa, qg = f.qa.double(), f.qg.double()  # float64: float32 rounding of these swamps a weak prior
        A, G = qa @ torch.diag(f.la.double()) @ qa.T, qg @ torch.diag(f.lg.double()) @ qg.T
        blocks.append(method.n_data * torch.kron(G, A))
    delta = method.prior_precision
    precision = torch.block_diag(*blocks) + delta * torch.eye(J.shape[-1], dtype=torch.float64)
    dense = J @ torch.linalg.solve(precision, J.transpose(1, 2))
    cov = method._logit_cov(feats, gram, delta)
    torch.testing.assert_close(cov.double(), dense, atol=1e-5, rtol=1e-3)
    # a grid of precisions in one call (prior=val_nll's tuning): each slice is that precision's covariance
    grid = [delta / 30.0, delta, 30.0 * delta]
    covs = method.logit_covs(feats, gram, grid)
    assert covs.shape == (3, 3, 4, 4)
    for d, c in zip(grid, covs, strict=True):
        dense_d = J @ torch.linalg.solve(torch.block_diag(*blocks) + d * torch.eye(J.shape[-1], dtype=torch.float64),
                                         J.transpose(1, 2))
        torch.testing.assert_close(c.double(), dense_d, atol=1e-5, rtol=1e-3)
    assert torch.diagonal(cov, dim1=1, dim2=2).min() > 0  # predictive variance > 0
    # prior="marglik_ab": the A factors have their own precision
    method.prior_precision_a = 7.0 * delta
    prior = torch.cat([torch.full((f.module.weight.numel(),), 7.0 * delta if k.endswith("lora_A") else delta,
                                  dtype=torch.float64) for k, f in method.factors.items()])
    dense = J @ torch.linalg.solve(torch.block_diag(*blocks) + torch.diag(prior), J.transpose(1, 2))
    torch.testing.assert_close(method._logit_cov(feats, gram, delta).double(), dense, atol=1e-5, rtol=1e-3)


def test_laplace_relative_jacobians_keep_every_logit_difference(mle_run):
    """The mean-field link (Laplace's default) reads only var(f_i - f_j): Jacobians of the differences to the first
    choice (one backward fewer) give the same predictive; the probit link keeps the full Jacobians."""
    method, model, scorer = _fitted_laplace(mle_run, prior_precision=3.0)
    enc = scorer.encode(_questions(3), n_choices=4)
    mean, feats, gram = method._jacobian_features(model, scorer, enc)
    rel_mean, rel_feats, rel_gram = method._jacobian_features(model, scorer, enc, relative=True)
    cov, rel_cov = method._logit_cov(feats, gram, 3.0), method._logit_cov(rel_feats, rel_gram, 3.0)
    D = _to_first_choice(4)
    torch.testing.assert_close(rel_cov.double(), D @ cov.double() @ D.T, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(rel_cov, cov)
    torch.testing.assert_close(method.predict(model, scorer, enc, n_samples=0).probs, meanfield_probs(mean, cov),
                               atol=1e-6, rtol=1e-5)
    method.config.link = "probit"
    torch.testing.assert_close(method.predict(model, scorer, enc).probs, probit_probs(mean, cov))


def test_laplace_shared_prefix_equals_one_pass(mle_run, monkeypatch):
    """The curvature's output gradients and the predictive's Jacobians do not depend on the forward layout."""
    method, model, scorer = _fitted_laplace(mle_run)
    enc = scorer.encode(_questions(3), n_choices=4)
    shared, one = method._jacobian_features(model, scorer, enc), method._jacobian_features(model, scorer,
                                                                                         enc.one_pass())
    torch.testing.assert_close(shared[0], one[0], atol=1e-5, rtol=1e-4)
    for k in shared[1]:
        torch.testing.assert_close(shared[1][k], one[1][k], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(shared[2][k], one[2][k], atol=1e-8, rtol=1e-4)
    stats = method._curvature_stats(model, scorer, _questions(4), 4, torch.Generator().manual_seed(0))
    encode = type(scorer).encode
    monkeypatch.setattr(scorer, "encode", lambda *a, **kw: encode(scorer, *a, **kw).one_pass())
    flat = method._curvature_stats(model, scorer, _questions(4), 4, torch.Generator().manual_seed(0))
    for k in flat:  # summed output gradients are equal; input means weight the context once per question
        torch.testing.assert_close(torch.cat(stats[k][1]), torch.cat(flat[k][1]), atol=1e-6, rtol=1e-4)


def test_laplace_notes_a_prior_tuned_to_the_grid_edge(mle_run, monkeypatch):
    """When the validation NLL is lowest at the strongest prior tried, the fit says so (the predictive is then about
    the adapter's own), and not otherwise."""
    from bayeslora.methods import laplace

    method, _, _ = _fitted_laplace(mle_run)
    assert method.prior_precision < laplace.VAL_GRID_MAX
    monkeypatch.setattr(laplace.Laplace, "_tune_val_nll", lambda self, *a: (laplace.VAL_GRID_MAX, 0.5))
    model, scorer = _adapter_model(mle_run)
    fit = laplace.Laplace(laplace.LaplaceConfig(n_fit=12)).fit(
        model, scorer, load_task("arith", "train", limit=12), batch_size=4, validation=_questions(4))
    assert "no posterior spread helps" in fit["note"] and "n_val" in fit["note"]


def test_laplace_reduces_to_map_as_prior_precision_grows(mle_run):
    method, model, scorer = _fitted_laplace(mle_run, prior_precision=1e12, link="probit")
    enc = scorer.encode(_questions(4), n_choices=4)
    with torch.no_grad():
        map_probs = torch.softmax(scorer.choice_logits(model, enc), -1)
    torch.testing.assert_close(method.predict(model, scorer, enc).probs, map_probs, atol=1e-5, rtol=1e-4)
    method.prior_precision = 1e-2
    assert (method.predict(model, scorer, enc).probs - map_probs).abs().max() > 1e-4


def test_laplace_meanfield_link_is_shift_invariant_and_close_to_mc():
    """The pairwise mean-field link: the binary probit on the logit difference for two choices, unchanged by a shift
    of all logits (the plain probit is not), absent choices get 0, and on random 4-choice Gaussians it is closer to
    the converged MC predictive than the probit."""
    import math

    from bayeslora.methods.linearized import sample_logit_gaussian

    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 4, generator=gen) * 2.0
    L = torch.randn(64, 4, 4, generator=gen)
    cov = L @ L.transpose(1, 2) + 0.1 * torch.eye(4)
    mf = meanfield_probs(mean, cov)
    assert torch.allclose(mf.sum(-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(meanfield_probs(mean - 7.0, cov), mf, atol=1e-6)
    assert not torch.allclose(probit_probs(mean - 7.0, cov), probit_probs(mean, cov), atol=1e-3)
    mc = sample_logit_gaussian(mean, cov, 200_000, torch.Generator().manual_seed(1)).softmax(-1).mean(0)
    assert (mf - mc).abs().mean() < 0.8 * (probit_probs(mean, cov) - mc).abs().mean()
    two_mean, two_cov = mean[:, :2], cov[:, :2, :2]
    d_var = two_cov[:, 0, 0] + two_cov[:, 1, 1] - 2 * two_cov[:, 0, 1]
    binary = torch.sigmoid((two_mean[:, 0] - two_mean[:, 1]) / torch.sqrt(1 + math.pi / 8 * d_var))
    assert torch.allclose(meanfield_probs(two_mean, two_cov)[:, 0], binary, atol=1e-5)
    absent = mean.clone()
    absent[:, 3] = -math.inf
    probs = meanfield_probs(absent, cov)
    assert torch.all(probs[:, 3] == 0) and torch.allclose(probs.sum(-1), torch.ones(64), atol=1e-5)


def test_laplace_val_nll_prior(mle_run):
    method, model, scorer = _fitted_laplace(mle_run, subset="last_layer")  # the default
    assert method.config.prior == "val_nll"
    assert method.tune_split == "validation" and 0 < method.prior_precision < float("inf")
    # the default link: the mean-field probabilities, with logit samples for the uncertainty split
    from bayeslora.methods.linearized import meanfield_probs

    enc = scorer.encode(load_task("arith", "validation", limit=6))
    mean, feats, gram = method._jacobian_features(model, scorer, enc)
    pred = method.predict(model, scorer, enc, generator=torch.Generator().manual_seed(0))
    assert method.config.link == "meanfield" and pred.sample_probs.shape == (50, 6, 4)
    torch.testing.assert_close(pred.probs, meanfield_probs(mean, method._logit_cov(feats, gram,
                                                                                   method.prior_precision)))
    assert not torch.allclose(pred.probs, pred.sample_probs.mean(0)) and torch.all(pred.epistemic >= 0)
    method.config.link = "mc"
    mc = method.predict(model, scorer, enc, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc.probs, mc.sample_probs.mean(0))
    torch.testing.assert_close(mc.sample_probs, pred.sample_probs)  # the same draws, averaged instead


def test_laplace_marglik_prior_maximizes_the_evidence(mle_run):
    from bayeslora.methods.laplace import log_evidence

    method, model, scorer = _fitted_laplace(mle_run, prior="marglik", subset="last_layer")
    assert method.tune_split is None and method.prior_precision_a is None
    grid = torch.logspace(-6, 8, 281, dtype=torch.float64)

    def best(keys):
        factors = [method.factors[k] for k in keys]
        eig = torch.cat([f.eig(method.n_data) for f in factors])
        sq = float(sum(f.module.weight.detach().double().pow(2).sum() for f in factors))
        return float(grid[int(log_evidence(eig, sq, grid).argmax())])

    assert method.prior_precision == pytest.approx(best(list(method.factors)))
    # marglik_ab: each factor kind maximizes its own evidence; the extra precision survives save and load
    ab, _, _ = _fitted_laplace(mle_run, prior="marglik_ab", subset="last_layer")
    a_keys = [k for k in ab.factors if k.endswith("lora_A")]
    b_keys = [k for k in ab.factors if k.endswith("lora_B")]
    assert ab.prior_precision_a == pytest.approx(best(a_keys)) and ab.prior_precision == pytest.approx(best(b_keys))
    state = ab.state_dict(model)
    again = type(ab)(ab.config)
    again.load_state_dict(model, state)
    assert again.prior_precision_a == ab.prior_precision_a and again.prior_precision == ab.prior_precision
    with pytest.raises(Exception, match="prior=marglik"):
        build = type(method)
        build(method.config.__class__()).fit(model, scorer, load_task("arith", "train", limit=8), validation=[])


def test_laplace_nan_adapter_is_a_clear_error(mle_run, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_run"
    shutil.copytree(mle_run, bad)
    weights = bad / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    state = {k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in state.items()}
    save_file(state, str(weights))
    with pytest.raises(PosthocError, match="LoRA weights hold NaN/inf"):  # found on load, before any fit
        bayesianize(bad, "laplace", tmp_path / "out", options={"n_fit": 4}, limit=8)
    assert not (tmp_path / "out").exists()


def test_choice_output_grads_batched_equals_loop(monkeypatch):
    from bayeslora.methods import linearized

    w = torch.randn(3, 5, requires_grad=True)
    h = torch.randn(4, 3) @ w  # (B=4, 5): an "output"
    logits = torch.tanh(h[:, :3]) * 2  # (B, C=3)
    batched = linearized.choice_output_grads(logits, [h])[0]
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real_grad(*args, **kwargs)

    present = torch.tensor([[True, True, True], [True, True, False], [True, True, True], [True, False, False]])
    relative = linearized.choice_output_grads(logits, [h], relative=True, present=present)[0]
    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    looped = linearized.choice_output_grads(logits, [h])[0]
    assert batched.shape == (3, 4, 5)
    torch.testing.assert_close(batched, looped)
    # relative: the gradients of f_c - f_0 (row 0 zero), zero at a question's absent choices; both paths
    expected = (batched - batched[:1]) * present.T[:, :, None]
    expected[0] = 0.0
    torch.testing.assert_close(relative, expected)
    looped_relative = linearized.choice_output_grads(logits, [h], relative=True, present=present)[0]
    torch.testing.assert_close(looped_relative, expected)


def test_source_with_a_posterior_or_an_empty_posterior_file(mle_run, tmp_path):
    from safetensors.torch import save_file

    from bayeslora.posthoc import resolve_source

    run = tmp_path / "run"
    shutil.copytree(mle_run, run)
    save_file({}, str(run / "posterior.safetensors"), metadata={"method": "mle"})  # names the method only
    assert resolve_source(run).method == "mle"
    save_file({"x.rho": torch.zeros(2)}, str(run / "posterior.safetensors"), metadata={"method": "blob"})
    with pytest.raises(PosthocError, match="posterior of its own"):
        resolve_source(run)


def test_tfb_searches_a_half_precision_model_in_float32(mle_run):
    """In bfloat16 any sigma > 0 moves the anchor NLL by the rounding of the perturbed sums (SmolLM2 on CPU: 0.67%
    at sigma 1e-4, above tau = 0.3%; on an H100 every TFB cell found sigma = 0): the search runs in float32 and
    gives the model back in its own dtypes."""
    from bayeslora.methods import build_method
    from bayeslora.posthoc import load_adapter, resolve_source
    from bayeslora.scoring import make_scorer

    src = resolve_source(mle_run)
    examples = load_task("arith", "train", limit=8)
    results, models = {}, {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_model(TINY, device="cpu")
        model = load_adapter(loaded.model, src.adapter_dir)
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        for p in base:  # the same bf16-rounded base weights in both models
            p.data = p.data.to(torch.bfloat16).to(dtype)
        method = build_method("tfb", TFB_FAST)
        results[name] = method.fit(model.eval(), make_scorer("cloze", loaded.tokenizer), examples,
                                   generator=torch.Generator().manual_seed(0))
        models[name] = model
        assert {p.dtype for p in base} == {dtype}  # given back in its own dtype
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert results["bf16"]["sigma"] > 0
    assert results["bf16"]["sigma"] == results["fp32"]["sigma"]
    assert results["bf16"]["anchor_nll0"] == pytest.approx(results["fp32"]["anchor_nll0"], rel=1e-6)
    with pytest.raises(Exception, match="search_dtype"):
        build_method("tfb", {"search_dtype": "float16"})


def test_adapter_weights_outside_the_posterior_are_named(tmp_path):
    """A plain PEFT adapter that also trains biases or whole modules: Laplace's posterior covers its LoRA matrices
    only, which is said (a warning, and run.json) instead of silently."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY).model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                              bias="all", init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.warns(UserWarning, match="also trains bias='all'.*LoRA A and B matrices only"):
        out = bayesianize(tmp_path / "adapter", "laplace", tmp_path / "lap", dataset="arith", model=TINY, limit=8,
                          options={"n_val": 8})
    assert json.loads((out / "run.json").read_text())["adapter"]["not_in_posterior"] == ["bias='all'"]
