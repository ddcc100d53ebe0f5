"""Method-specific behaviour of map, mcd, ens and blob, and the bad-input errors of issue 3."""

from __future__ import annotations

import json

import pytest
import torch

from bayeslora.cli import main
from bayeslora.config import TrainConfig
from bayeslora.methods import AdapterConfig, MethodError, build_method, get_method_class
from bayeslora.methods.blob import gaussian_kl
from bayeslora.methods.head import head_sample_logits
from bayeslora.methods.mcd import DropoutLoraA
from bayeslora.models import load_model
from bayeslora.peft_ext import adapter_names, stochastic_layers
from bayeslora.runs import load_run
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task
from bayeslora.train import train

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def examples():
    return load_task("arith", "train", limit=8)


def _prepared(name: str, options: dict | None = None, adapter: AdapterConfig | None = None):
    torch.manual_seed(0)
    loaded = load_model(TINY)
    method = build_method(name, options)
    model = method.prepare(loaded.model, adapter or AdapterConfig())
    with torch.no_grad():  # move B off zero so that the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    model.eval()
    return method, model, make_scorer("cloze", loaded.tokenizer, max_length=64)


def test_map_defaults_to_weight_decay():
    assert build_method("map").config.weight_decay > 0
    with pytest.raises(MethodError, match="weight_decay"):
        build_method("map", {"weight_decay": 0})


def test_mcd_one_mask_per_question_shared_by_its_rows(examples):
    method, model, scorer = _prepared("mcd", {"p": 0.5})
    assert all(isinstance(m, DropoutLoraA) for m in stochastic_layers(model))
    one = scorer.encode(examples[:1])
    enc = one.repeat(2)  # two copies of the same question in one batch: with one group they must agree
    with method.sampling(model, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(0)):
        same = scorer.choice_logits(model, enc)
    assert torch.allclose(same[0], same[1])
    logits = method.sample_logits(model, scorer, one, 6, torch.Generator().manual_seed(0))
    assert logits.shape == (6, 1, 4) and not torch.allclose(logits[0], logits[1])
    with pytest.raises(MethodError, match="`p`"):
        build_method("mcd", {"p": 1.0})


def test_batched_and_sequential_samples_agree_in_distribution(examples):
    method, model, scorer = _prepared("mcd", {"p": 0.0})  # p = 0: every sample is the mean, exactly
    enc = scorer.encode(examples[:3])
    batched = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), batched=True)
    sequential = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), batched=False)
    assert torch.allclose(batched, sequential, atol=1e-5)


def test_blob_kl_matches_torch_distributions():
    mean, std = torch.randn(4, 5) * 0.1, torch.rand(4, 5) * 0.05 + 0.01
    q, p = torch.distributions.Normal(mean.double(), std.double()), torch.distributions.Normal(0.0, 0.2)
    expected = torch.distributions.kl_divergence(q, p).sum()
    assert torch.allclose(gaussian_kl(mean, std, 0.2), expected)


def test_blob_samples_mean_and_head_predictive(examples):
    method, model, scorer = _prepared("blob", {"init_eps": 0.5})
    enc = scorer.encode(examples[:4])
    mean = method.predict(model, scorer, enc, n_samples=0)
    assert mean.sample_probs is None
    assert torch.allclose(mean.probs, torch.softmax(scorer.choice_logits(model, enc), -1))
    mc = method.predict(model, scorer, enc, n_samples=5, generator=torch.Generator().manual_seed(0))
    assert mc.sample_probs.shape == (5, 4, 4) and mc.epistemic.sum() > 0
    head = head_sample_logits(model, scorer, enc, 5, torch.Generator().manual_seed(0))
    assert head.shape == (5, 4, 4) and not torch.allclose(head[0], head[1])
    for layer in stochastic_layers(model):  # zero posterior std: the head samples are the mean
        layer.rho.data.zero_()
    head = head_sample_logits(model, scorer, enc, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(head[0], scorer.choice_logits(model, enc), atol=1e-5)


def test_blob_antithetic_predictive_mirrors_its_samples(examples):
    """Each pair's average cancels the first-order effect of the noise: it sits far closer to the posterior mean
    than either sample (second order in sigma), and an odd sample count is refused."""
    method, model, scorer = _prepared("blob", {"init_eps": 0.05, "predictive": "antithetic"})
    enc = scorer.encode(examples[:4])
    mean = scorer.choice_logits(model, enc)
    pred = method.predict(model, scorer, enc, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert pred.sample_probs.shape == (4, 4, 4) and pred.epistemic.sum() > 0
    logits = method.sample_logits(model, scorer, enc, 4, torch.Generator().manual_seed(0), antithetic=True)
    assert torch.allclose(pred.sample_probs, torch.softmax(logits, -1), atol=1e-6)  # predict draws the pairs
    for s in (0, 1):  # sample s + 2 mirrors sample s
        first_order = (logits[s] - mean).abs().max()
        assert first_order > 1e-3
        assert ((logits[s] + logits[s + 2]) / 2 - mean).abs().max() < 0.1 * first_order
    with pytest.raises(MethodError, match="even"):
        method.predict(model, scorer, enc, n_samples=3)


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_blob_mean_prompt_samples_only_the_scored_positions(examples, fmt):
    """``prompt=mean``: one prompt pass at the posterior mean, S samples of the scored positions on its cache.
    With zero posterior std every sample is the deterministic forward (the cache split and positions are exact);
    the shared-context cloze layout and the one-pass layout draw the same samples (continuations of one length)."""
    method, model, scorer = _prepared("blob", {"init_eps": 0.5, "prompt": "mean"})
    if fmt == "letter":
        scorer = make_scorer("letter", scorer.tokenizer, max_length=64)
    enc = scorer.encode(examples[:4])  # different lengths: left padding in the prompt pass
    assert enc.shared_prefix == (fmt == "cloze")
    pred = method.predict(model, scorer, enc, n_samples=3, generator=torch.Generator().manual_seed(0))
    logits = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), mean_prompt=True)
    assert torch.allclose(pred.sample_probs, torch.softmax(logits, -1), atol=1e-6)  # predict uses the option
    assert not torch.allclose(logits[0], logits[1])
    full = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0))
    assert not torch.allclose(logits, full, atol=1e-4)  # the prompt is not sampled
    if fmt == "cloze":
        # with continuations of one length the layouts sample the same positions (where lengths differ, the
        # one-pass layout also samples the context tokens that fall in a shorter row's last K + 1 positions)
        tok = scorer.tokenizer
        pool = load_task("arith", "train", limit=64)
        lengths = [{len(tok(c, add_special_tokens=False)["input_ids"]) for _, c in ex.cloze} for ex in pool]
        even = [ex for ex, n in zip(pool, lengths, strict=True) if n == {3}][:4]  # " NN": three byte tokens
        assert len(even) == 4
        enc = scorer.encode(even)
        logits = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), mean_prompt=True)
        one_pass = method.sample_logits(model, scorer, enc.one_pass(), 3, torch.Generator().manual_seed(0),
                                        mean_prompt=True)
        assert torch.allclose(one_pass, logits, atol=1e-4)
    for layer in stochastic_layers(model):
        layer.rho.data.zero_()
    logits = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), mean_prompt=True)
    deterministic = scorer.choice_logits(model, enc)
    for s in range(3):
        assert torch.allclose(logits[s], deterministic, atol=1e-5)
    with pytest.raises(MethodError, match="prompt"):
        build_method("blob", {"prompt": "last"})


def test_prompt_mean_is_a_prediction_option_of_every_sampled_method(examples):
    """``prompt`` lives on SampledConfig: MC-dropout, TFB and sgp take it as BLoB does, at evaluation time too (TFB
    with weight samples: its default linearized predictive draws none)."""
    for name in ("blob", "mcd", "tfb", "sgp"):
        cls = get_method_class(name)
        extra = {"predictive": "mc"} if name == "tfb" else {}
        config = cls.config_cls.with_prediction_options(cls.config_cls().to_dict(), {"prompt": "mean", **extra})
        assert config.sample_plan().mean_prompt and not cls.config_cls().sample_plan().mean_prompt
        with pytest.raises(MethodError, match="prompt"):
            build_method(name, {"prompt": "last"})
    method, model, scorer = _prepared("mcd", {"p": 0.3, "prompt": "mean"})
    enc = scorer.encode(examples[:3])
    pred = method.predict(model, scorer, enc, n_samples=3, generator=torch.Generator().manual_seed(0))
    logits = method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0), mean_prompt=True)
    assert torch.allclose(pred.sample_probs, torch.softmax(logits, -1), atol=1e-6)
    assert not torch.allclose(logits, method.sample_logits(model, scorer, enc, 3, torch.Generator().manual_seed(0)),
                              atol=1e-4)


@pytest.mark.parametrize("name, options, mode", [
    ("blob", {}, "mc"), ("blob", {"predictive": "antithetic"}, "antithetic"),
    ("blob", {"prompt": "mean"}, "mean_prompt"), ("mcd", {"p": 0.3}, "mc")])
def test_sample_chunk_splits_the_samples_into_batched_forwards(examples, name, options, mode):
    """``sample_chunk=c``: the S samples run c per forward, drawn one chunk after the other from the generator, so
    a chunked predictive equals its chunks drawn by hand; 0 (the default) is one forward; antithetic pairs stay in
    their chunk."""
    eps = 0.05 if mode == "antithetic" else 0.3  # small noise: a pair's average is second order in it
    method, model, scorer = _prepared(name, {"init_eps": eps, **options} if name == "blob" else options)
    enc = scorer.encode(examples[:3])
    kw = {"antithetic": mode == "antithetic", "mean_prompt": mode == "mean_prompt"}
    whole = method.sample_logits(model, scorer, enc, 4, torch.Generator().manual_seed(0), **kw)
    method.config.sample_chunk = 2
    gen = torch.Generator().manual_seed(0)
    chunked = method.sample_logits(model, scorer, enc, 4, gen, **kw)
    method.config.sample_chunk = 0
    gen = torch.Generator().manual_seed(0)
    by_hand = torch.cat([method.sample_logits(model, scorer, enc, 2, gen, **kw) for _ in range(2)])
    assert chunked.shape == whole.shape == (4, 3, 4)
    torch.testing.assert_close(chunked, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(chunked, whole, atol=1e-4)  # different draws, same layout
    assert not torch.allclose(chunked[0], chunked[2], atol=1e-4)  # the second chunk draws new samples
    if mode == "antithetic":  # each chunk of 2 is one mirrored pair
        mean = scorer.choice_logits(model, enc)
        for s in (0, 2):
            assert ((chunked[s] + chunked[s + 1]) / 2 - mean).abs().max() < 0.1 * (chunked[s] - mean).abs().max()
    method.config.sample_chunk = 3  # S = 4 in chunks of 3 and 1 (antithetic: one chunk of 4)
    pred = method.predict(model, scorer, enc, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert pred.sample_probs.shape == (4, 3, 4)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(3))
    with pytest.raises(MethodError, match="sample_chunk"):
        build_method(name, {"sample_chunk": -1})


def test_blob_head_predictive_needs_a_head_lora(examples):
    method, model, scorer = _prepared("blob", {"predictive": "head"},
                                      AdapterConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="LM head"):
        method.predict(model, scorer, scorer.encode(examples[:2]), n_samples=2)
    with pytest.raises(MethodError, match="predictive"):
        build_method("blob", {"predictive": "laplace"})


def test_blob_kl_is_the_sum_of_its_layers_kl():
    """The fused KL (one pass over all layers' concatenated parameters) equals the per-layer sum, gradients too."""
    method, model, _ = _prepared("blob")
    layers = method._layers
    assert len(layers) > 1
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.rho.mul_(1.0 + 0.1 * i)  # layers differ
    fused = method.kl()
    fused.backward()
    grads = [layer.rho.grad.clone() for layer in layers]
    model.zero_grad()
    per_layer = sum(gaussian_kl(layer.weight, layer.std(), method.config.prior_std) for layer in layers)
    per_layer.backward()
    assert torch.allclose(fused.double(), per_layer, rtol=1e-6)
    assert all(torch.allclose(g, layer.rho.grad) for g, layer in zip(grads, layers, strict=True))


def test_blob_kl_weighting_is_per_example():
    assert build_method("blob").kl_scale(200) == pytest.approx(1 / 200)
    assert build_method("blob", {"kl_weight": 8}).kl_scale(200) == pytest.approx(8 / 200)


def test_ensemble_members_differ_and_all_train(examples):
    method, model, scorer = _prepared("ens", {"n_members": 3})
    assert adapter_names(model) == ["default", "member1", "member2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(any(f".{m}." in n for n in trainable) for m in ("default", "member1", "member2"))
    pred = method.predict(model, scorer, scorer.encode(examples[:4]))
    assert pred.sample_probs.shape == (3, 4, 4)
    assert not torch.allclose(pred.sample_probs[0], pred.sample_probs[1])
    # one batched forward gives what each member gives alone
    enc = scorer.encode(examples[:4])
    alone = method.sample_logits(model, scorer, enc, 3, batched=False)
    assert torch.allclose(alone, method.sample_logits(model, scorer, enc, 3), atol=1e-5)


def _tiny_run(tmp_path, method: str, steps: int = 2, **kw):
    config = TrainConfig(model=TINY, dataset="arith", method=method, max_steps=steps, batch_size=2,
                         train_limit=8, save_every=1, max_length=64, **kw)
    return train(config, tmp_path / method, progress=False)


def test_ensemble_missing_member_is_a_clear_error(tmp_path):
    run_dir = _tiny_run(tmp_path, "ens")
    assert (run_dir / "adapter" / "member2" / "adapter_config.json").is_file()
    load_run(run_dir)
    (run_dir / "adapter" / "member2" / "adapter_config.json").unlink()
    with pytest.raises(MethodError, match="member2"):
        load_run(run_dir)


def test_missing_or_corrupted_posterior(tmp_path, capsys):
    run_dir = _tiny_run(tmp_path, "blob")
    posterior = run_dir / "posterior.safetensors"
    assert json.loads((run_dir / "run.json").read_text())["method"] == "blob"
    posterior.write_bytes(b"\x00garbage")
    with pytest.raises(MethodError, match="corrupted"):
        load_run(run_dir)
    posterior.unlink()
    with pytest.raises(MethodError, match="needs its posterior"):
        load_run(run_dir)
    assert main(["eval", str(run_dir), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "posterior" in err[0]


def test_nan_in_a_saved_adapter_or_posterior_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = _tiny_run(tmp_path, "blob")
    for path, metadata in ((run_dir / "posterior.safetensors", {"method": "blob"}),
                           (run_dir / "adapter" / "adapter_model.safetensors", {"format": "pt"})):
        original = path.read_bytes()
        state = load_file(str(path))
        key = sorted(state)[0]
        state[key] = torch.full_like(state[key], float("nan"))
        save_file(state, str(path), metadata=metadata)
        with pytest.raises(MethodError, match="NaN/inf"):
            load_run(run_dir)
        path.write_bytes(original)
    load_run(run_dir)


def test_ensemble_size_is_bounded():
    """A hand-edited `n_members` of a billion filled 24 GB building member names before any check."""
    with pytest.raises(MethodError, match="from 1 to 64"):
        build_method("ens", {"n_members": 1_000_000_000})


def test_unknown_method_on_the_cli(tmp_path, capsys):
    assert main(["train", "--model", TINY, "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err


def test_negative_samples_on_the_cli(tmp_path, capsys):
    run_dir = _tiny_run(tmp_path, "mcd", steps=1)
    assert main(["eval", str(run_dir), "--limit", "2", "--samples", "-1"]) == 2
    assert "n_samples" in capsys.readouterr().err


def test_eval_warns_when_the_posterior_is_a_point_mass(tmp_path, capsys):
    # after one step at the paper's init, BLoB's sigma is ~0.002: the samples are practically one model
    run_dir = _tiny_run(tmp_path, "blob", steps=1)
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "3"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[0])["mean_epistemic"] < 1e-3 and "nearly a point mass" in err
    assert "rho_lr" in err
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "0"]) == 0  # no samples, no note
    assert "point mass" not in capsys.readouterr().err
    # a prediction-time option overrides the saved one; a bad one is a clear error
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "2", "--option", "predictive=antithetic"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 4
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "3", "--option", "predictive=antithetic"]) == 2
    assert "even" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--limit", "4", "--option", "predictive=nope"]) == 2
    assert "predictive" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "2", "--option", "predictive=antithetic",
                 "--option", "prompt=mean"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 4
    assert main(["eval", str(run_dir), "--limit", "4", "--option", "predictive=head", "--option", "prompt=mean"]) == 2
    assert "head predictive" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--limit", "4", "--samples", "3", "--option", "sample_chunk=2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n"] == 4
    assert main(["eval", str(run_dir), "--limit", "4", "--option", "sample_chunk=-2"]) == 2
    assert "sample_chunk" in capsys.readouterr().err
    # a training-time option would have no effect on a saved run: refused, naming the ones that do work
    assert main(["eval", str(run_dir), "--limit", "4", "--option", "prior_std=0.5"]) == 2
    err = capsys.readouterr().err
    assert "prior_std" in err and "'predictive'" in err and "cannot change on a saved run" in err
    # an option the method does not have: the list offered is the prediction-time one, not every field
    assert main(["eval", str(run_dir), "--limit", "4", "--option", "link=probit"]) == 2
    err = capsys.readouterr().err
    assert "Unknown option(s) ['link']" in err and "'predictive'" in err and "weight_decay" not in err


def test_serve_applies_prediction_options(tmp_path):
    """`bayeslora serve RUN --option KEY=VALUE`: the same prediction-time overrides as eval, checked before the
    model loads; with no run there is no method to apply them to."""
    from bayeslora.serve import InferenceService

    run_dir = _tiny_run(tmp_path, "blob", steps=1)
    service = InferenceService.load(run_dir, options={"predictive": "antithetic", "sample_chunk": 2})
    assert (service.run.method.config.predictive, service.run.method.config.sample_chunk) == ("antithetic", 2)
    assert service.models().data[0].prediction_options == {"sample_chunk": 2, "prompt": "sample",
                                                           "predictive": "antithetic"}  # told to clients
    assert InferenceService.load(run_dir).run.method.config.sample_chunk == 0
    with pytest.raises(MethodError, match="prior_std"):
        InferenceService.load(run_dir, options={"prior_std": 0.5})
    with pytest.raises(ValueError, match="RUN_DIR"):
        InferenceService.load(None, TINY, options={"n_samples": 2})
    # on the command line: a one-line error before any server starts
    assert main(["serve", str(run_dir), "--option", "prior_std=0.5"]) == 2
    assert main(["serve", str(run_dir), "--option", "sample_chunk"]) == 2


def test_blob_rho_lr_is_its_own_group_and_lets_sigma_grow(tmp_path):
    method, model, _ = _prepared("blob", {"rho_lr": 0.05})
    groups = method.param_groups(model)
    assert "lr" not in groups[0] and groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    with pytest.raises(MethodError, match="rho_lr"):
        build_method("blob", {"rho_lr": 0.0})

    def mean_std(run_dir):
        run = load_run(run_dir)
        return torch.cat([layer.std().flatten() for layer in stochastic_layers(run.model)]).mean().item()

    # the KL pushes sigma (initially ~0.002) towards the prior's 0.2: at lr 1e-4 Adam barely moves rho in 3 steps
    slow = mean_std(_tiny_run(tmp_path / "a", "blob", steps=3, lr=1e-4))
    fast = mean_std(_tiny_run(tmp_path / "b", "blob", steps=3, lr=1e-4, method_options={"rho_lr": 0.05}))
    assert slow < 0.0025 < 0.01 < fast


def test_noise_is_drawn_on_the_layer_device_deterministically():
    """On CPU the context draws from its generator itself; on an accelerator from a device generator seeded once
    per context from it (no blocking host-to-device copy per layer), so the same generator gives the same noise."""
    from bayeslora.peft_ext import SamplingState, device_generator

    g = torch.Generator().manual_seed(3)
    assert device_generator(g, torch.device("cpu")) is g
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        draws = []
        for _ in range(2):
            state = SamplingState(groups=torch.arange(4), n_groups=4, generator=torch.Generator().manual_seed(3))
            draws.append(state.draw(torch.randn, (4, 5), device))
            assert draws[-1].device.type == device and draws[-1].dtype == torch.float32
        assert torch.equal(draws[0], draws[1])
    expected = torch.randn((4, 5), generator=torch.Generator().manual_seed(3))
    state = SamplingState(groups=torch.arange(4), n_groups=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(state.draw(torch.randn, (4, 5), "cpu"), expected)  # CPU runs keep their earlier samples


@pytest.mark.parametrize("with_rows", [False, True])
def test_one_sample_per_question_needs_no_index_and_matches_explicit_groups(with_rows):
    """``groups=None`` (training, batched prediction) gives the same outputs and gradients as the explicit
    ``groups=arange(B)``, with no gather in the forward when rows are questions; with a row-to-question map the
    index is built once per forward and shared by the layers."""
    from bayeslora.peft_ext import sample_groups
    from bayeslora.peft_ext.stochastic import GaussianLoraA

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*(GaussianLoraA(torch.nn.Linear(6, 6, bias=False), torch.full((6, 6), 0.3),
                                                 lambda r: r * r) for _ in range(2)))
    x = torch.randn(6 if with_rows else 3, 5, 6)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    results = []
    for groups in (torch.arange(3), None):
        layers.zero_grad()
        with sample_groups(layers, groups, n_groups=3, generator=torch.Generator().manual_seed(1)) as state:
            if with_rows:
                state.rows = rows
            with torch.profiler.profile() as prof:
                out = layers(x)
            out.square().sum().backward()
        ops = {e.key: e.count for e in prof.key_averages()}
        results.append((out.detach(), [layer.rho.grad.clone() for layer in layers], ops))
        if groups is None and not with_rows:
            assert "aten::index_select" not in ops and "aten::index" not in ops
        if with_rows:
            assert len([k for k in state.cache if isinstance(k, tuple) and k[0] == "rows"]) == 1  # both layers
    (out_a, grads_a, _), (out_b, grads_b, _) = results
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)
    with sample_groups(layers, None, n_groups=2) as state, pytest.raises(RuntimeError, match="2 samples"):
        layers(torch.randn(3, 5, 6))
    with pytest.raises(ValueError, match="n_groups"):
        with sample_groups(layers, None):
            pass


def test_gaussian_layer_is_an_exact_weight_sample_per_group():
    """Row ``i`` of group ``g`` sees ``x @ (M + std * eps_g)^T``, and ``rho`` and the mean get the gradients of
    that expression."""
    from bayeslora.peft_ext import sample_groups
    from bayeslora.peft_ext.stochastic import GaussianLoraA

    torch.manual_seed(0)
    layer = GaussianLoraA(torch.nn.Linear(6, 3, bias=False), torch.rand(3, 6) * 0.5, lambda r: r * r)
    x = torch.randn(2, 4, 6)
    with sample_groups(layer, None, n_groups=2, generator=torch.Generator().manual_seed(1)) as state:
        out = layer(x)
    eps = state.cache[id(layer)]
    mean, rho = layer.weight.detach().clone().requires_grad_(), layer.rho.detach().clone().requires_grad_()
    expected = torch.stack([x[g] @ (mean + rho * rho * eps[g]).T for g in range(2)])
    torch.testing.assert_close(out, expected)
    out.sin().sum().backward()
    expected.sin().sum().backward()
    torch.testing.assert_close(layer.rho.grad, rho.grad)
    torch.testing.assert_close(layer.weight.grad, mean.grad)
    assert torch.equal(layer(x), x @ layer.weight.T)  # outside a sampling context: the mean


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_training_step_gathers_noise_only_where_rows_are_not_questions(examples, fmt):
    """With one row per question (the letter format, the cloze context pass) the scorer tells the layers that rows
    are questions: no gather in their forward, no scatter in the backward. Only the cloze continuation pass, whose
    rows are choices, gathers (once per stochastic layer)."""
    scorer = make_scorer(fmt, load_model(TINY).tokenizer, max_length=64)
    enc = scorer.encode(examples[:3])
    assert enc.shared_prefix == (fmt == "cloze")
    counts = {}
    for name in ("mle", "blob"):  # the embedding lookup and the scorer gather too: count the difference
        method, model, _ = _prepared(name)
        model.train()
        with torch.profiler.profile() as prof:
            method.nll(model, scorer, enc, torch.Generator().manual_seed(0)).backward()
        ops = {e.key: e.count for e in prof.key_averages()}
        counts[name] = (ops.get("aten::index_select", 0), ops.get("aten::index_add_", 0))
    gathers = 0 if fmt == "letter" else len(stochastic_layers(model))
    assert [b - m for b, m in zip(counts["blob"], counts["mle"], strict=True)] == [gathers, gathers]


def test_adapter_routing_reads_the_row_map_once_per_forward():
    """Reading the row map is a device synchronization on an accelerator: once per map, not once per layer."""
    from bayeslora.peft_ext.adapters import AdapterRouting

    routing = AdapterRouting(["a", "b"], rows=torch.tensor([0, 0, 1]))
    first = routing.row_names(3)
    assert first == ["a", "a", "b"] and routing.row_names(3) is first
    routing.rows = torch.tensor([1, 0, 0])
    assert routing.row_names(3) == ["b", "a", "a"]
    routing.rows = None
    assert routing.row_names(2) == ["a", "b"]
    with pytest.raises(RuntimeError, match="3 rows"):
        routing.row_names(3)
