"""Bayesian-LoRA (``sgp``): Kronecker/Matheron algebra vs dense Gaussians, flow log-determinant, LoRA limit, I/O."""

from __future__ import annotations

import pytest
import torch

from bayeslora.methods import MethodError, build_method
from bayeslora.methods.base import AdapterConfig
from bayeslora.methods.sgp import SGPLoraFactor, per_group_matmul
from bayeslora.methods.sgp_math import (
    CholeskyError,
    MaskedAffineFlow,
    conditional_weight,
    jittered_cholesky,
    kronecker_prior_cov,
    whitened_prior,
)
from bayeslora.models import build_tiny_llama
from bayeslora.peft_ext import stochastic_layers
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task

TINY_ADAPTER = AdapterConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "lm_head"])


def _prior(d_out=3, d_in=2, m_r=2, m_c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z_r = torch.randn(m_r, d_out, generator=g, dtype=torch.float64)
    Z_c = torch.randn(m_c, d_in, generator=g, dtype=torch.float64)
    d_r = torch.rand(m_r, generator=g, dtype=torch.float64) + 0.3
    d_c = torch.rand(m_c, generator=g, dtype=torch.float64) + 0.3
    return Z_r, d_r, Z_c, d_c


def _dense_conditional(Z_r, d_r, Z_c, d_c, U):
    """Dense Gaussian conditioning of vec(W) ~ N(0, I) on vec(U) = (Z_c ⊗ Z_r) vec(W) + noise (column-major vec)."""
    K_U = kronecker_prior_cov(Z_r, d_r, Z_c, d_c)
    C = torch.kron(Z_c, Z_r)  # cov(vec U, vec W)
    mean = C.T @ torch.linalg.solve(K_U, U.T.reshape(-1))
    cov = torch.eye(C.shape[1], dtype=C.dtype) - C.T @ torch.linalg.solve(K_U, C)
    return mean, cov


def test_conditional_mean_matches_dense_kronecker_computation():
    Z_r, d_r, Z_c, d_c = _prior(d_out=5, d_in=4, m_r=3, m_c=2)
    rows, cols = whitened_prior(Z_r, d_r), whitened_prior(Z_c, d_c)
    u = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    L_r = torch.linalg.cholesky(Z_r @ Z_r.T + torch.diag(d_r**2))
    L_c = torch.linalg.cholesky(Z_c @ Z_c.T + torch.diag(d_c**2))
    U = L_r @ u[0] @ L_c.T
    mean, _ = _dense_conditional(Z_r, d_r, Z_c, d_c, U)
    W = conditional_weight(u, torch.tensor(1.0, dtype=torch.float64), rows, cols)[0]
    torch.testing.assert_close(W.T.reshape(-1), mean)
    # whitened transforms: Qᵀ Q + P Pᵀ = I
    torch.testing.assert_close(rows.Q.T @ rows.Q + rows.P @ rows.P.T, torch.eye(3, dtype=torch.float64))


def test_matheron_samples_match_dense_conditional_mean_and_covariance():
    d_out, d_in, m_r, m_c, n = 3, 2, 2, 2, 200_000
    Z_r, d_r, Z_c, d_c = _prior(d_out, d_in, m_r, m_c)
    rows, cols = whitened_prior(Z_r, d_r), whitened_prior(Z_c, d_c)
    g = torch.Generator().manual_seed(2)
    u = torch.randn(1, m_r, m_c, generator=g, dtype=torch.float64)
    L_r = torch.linalg.cholesky(Z_r @ Z_r.T + torch.diag(d_r**2))
    L_c = torch.linalg.cholesky(Z_c @ Z_c.T + torch.diag(d_c**2))
    mean, cov = _dense_conditional(Z_r, d_r, Z_c, d_c, L_r @ u[0] @ L_c.T)
    noise = tuple(torch.randn(n, *s, generator=g, dtype=torch.float64)
                  for s in [(d_out, d_in), (d_out, m_c), (m_r, d_in), (m_r, m_c)])
    lam = torch.tensor(0.5, dtype=torch.float64)
    W = conditional_weight(u.expand(n, -1, -1), lam, rows, cols, noise)  # (n, d_out, d_in)
    vec = W.transpose(1, 2).reshape(n, -1)
    torch.testing.assert_close(vec.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(vec.T), lam**2 * cov, atol=0.01, rtol=0)


def test_flow_logdet_matches_autograd_jacobian():
    torch.manual_seed(0)
    flow = MaskedAffineFlow(features=5, hidden=16).double()
    with torch.no_grad():
        for p in flow.out.parameters():
            p.normal_(0, 0.5)  # leave the identity initialization
    x = torch.randn(5, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x)
    assert torch.allclose(J.triu(1), torch.zeros_like(J))  # autoregressive: y_i depends on x_<=i only
    torch.testing.assert_close(flow(x)[1], torch.linalg.slogdet(J).logabsdet)


def test_jittered_cholesky_recovers_then_fails_clearly():
    singular = torch.ones(3, 3)  # PSD, rank 1: needs jitter
    L = jittered_cholesky(singular)
    assert torch.isfinite(L).all()
    with pytest.raises(CholeskyError, match="K_r.*not positive definite"):
        jittered_cholesky(-torch.eye(3), "K_r")
    with pytest.raises(CholeskyError, match="non-finite"):
        jittered_cholesky(torch.full((2, 2), float("nan")), "K_c")
    assert issubclass(CholeskyError, ValueError)  # reaches the CLI as one line, exit 2


def test_per_group_matmul_fast_path_equals_gather():
    x, w = torch.randn(6, 2, 3), torch.randn(3, 3, 4)
    blocks = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(per_group_matmul(x, w, blocks), torch.bmm(x, w[blocks]))
    mixed = torch.tensor([0, 1, 1, 2, 0, 2])
    torch.testing.assert_close(per_group_matmul(x, w, mixed), torch.bmm(x, w[mixed]))


def _prepared(options=None, seed=0):
    torch.manual_seed(seed)
    model, tokenizer = build_tiny_llama()
    method = build_method("sgp", options or {})
    return method, method.prepare(model, TINY_ADAPTER), tokenizer


def _batch(tokenizer, n=3):
    scorer = make_scorer("cloze", tokenizer, max_length=64)
    examples = load_task("arith", "validation", limit=n)
    return scorer, scorer.encode(examples, n_choices=4)


def test_targets_q_k_lm_head_and_only_those_factors_generated():
    method, model, _ = _prepared()
    names = [n for n, m in model.named_modules() if isinstance(m, SGPLoraFactor)]
    assert len(names) == 2 * (2 * 2 + 1)  # (q, k) x 2 layers + lm_head, A and B each
    assert all(any(t in n for t in ("q_proj", "k_proj", "lm_head")) for n in names)
    assert not any("v_proj" in n for n in names)  # v_proj keeps plain LoRA
    assert all(not m.weight.requires_grad for m in stochastic_layers(model))


def test_lambda_and_sigma_to_zero_recover_plain_lora():
    method, model, tokenizer = _prepared({"init_lamda": 1e-12, "max_lamda": 1e-12, "init_sd_u": 1e-12,
                                         "max_sd_u": 1e-12})
    scorer, enc = _batch(tokenizer)
    with torch.no_grad():
        for m in method._layers:  # a non-trivial flow and weights
            m.inducing_mean.mul_(50.0)
            for p in m.flow.out.parameters():
                p.normal_(0, 0.3)
        means = {id(m): m.mean_weight() for m in method._layers}
        sampled = method.predict(model, scorer, enc, n_samples=3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain_base, _ = build_tiny_llama()
    from peft import get_peft_model

    plain = get_peft_model(plain_base, TINY_ADAPTER.lora_config(target_modules=["q_proj", "v_proj", "lm_head",
                                                                               "k_proj"]))
    src = dict(model.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            if isinstance(src.get(name), SGPLoraFactor):
                module.weight.copy_(means[id(src[name])])
            elif isinstance(module, torch.nn.Linear) and "lora_" in name:
                module.weight.copy_(src[name].weight)
        reference = scorer.choice_logits(plain, enc).softmax(-1)
    assert means[id(method._layers[0])].abs().max() > 1e-3
    torch.testing.assert_close(sampled.probs, reference, atol=1e-5, rtol=1e-4)
    for s in range(3):
        torch.testing.assert_close(sampled.sample_probs[s], reference, atol=1e-5, rtol=1e-4)


def test_training_step_kl_and_gradients():
    method, model, tokenizer = _prepared()
    scorer, enc = _batch(tokenizer)
    model.train()
    nll = method.nll(model, scorer, enc, torch.Generator().manual_seed(0))
    kl = method.kl()
    assert torch.isfinite(nll) and torch.isfinite(kl) and kl > 0
    (nll + method.kl_scale(100) * kl).backward()
    layer = method._layers[0]
    for p in (layer.inducing_mean, layer.inducing_rho, layer.z_row, layer.z_col, layer.lamda_rho,
              layer.flow.out.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert torch.isfinite(method.kl())  # without a cached sample: the estimate at u0 = mu


def test_scale_lr_puts_lambda_and_sigma_in_their_own_group():
    method, model, tokenizer = _prepared({"scale_lr": 0.05})
    default, scales = method.param_groups(model)
    n_scales = sum(1 for layer in method._layers for _ in (layer.lamda_rho, layer.inducing_rho))
    assert scales["lr"] == 0.05 and scales["weight_decay"] == 0.0 and len(scales["params"]) == n_scales
    assert "lr" not in default and not {id(p) for p in scales["params"]} & {id(p) for p in default["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in (default, scales) for p in g["params"]} == trainable
    # lambda grows from its 1e-3 init only at the scale learning rate
    scorer, enc = _batch(tokenizer)
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-4)
    model.train()
    for _ in range(3):
        loss = method.nll(model, scorer, enc, torch.Generator().manual_seed(0)) + method.kl_scale(100) * method.kl()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert min(layer.lamda().item() for layer in method._layers) > 1.1e-3


def test_predict_samples_one_weight_per_question():
    method, model, tokenizer = _prepared({"init_lamda": 0.03, "init_sd_u": 0.1, "sample_chunk": 2})
    scorer, enc = _batch(tokenizer, n=2)
    pred = method.predict(model, scorer, enc, n_samples=5, generator=torch.Generator().manual_seed(0))
    assert pred.probs.shape == (2, 4) and pred.sample_probs.shape == (5, 2, 4)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(2))
    assert (pred.sample_probs[0] - pred.sample_probs[1]).abs().max() > 0  # samples differ
    again = method.predict(model, scorer, enc, n_samples=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred.sample_probs, again.sample_probs, atol=0, rtol=0)
    assert method.predict(model, scorer, enc, n_samples=0).n_samples == 0


def test_half_precision_model_keeps_float32_posterior():
    base, tokenizer = build_tiny_llama()
    method = build_method("sgp")
    model = method.prepare(base.to(torch.bfloat16), TINY_ADAPTER)
    assert all(p.dtype == torch.float32 for m in method._layers for n, p in m.named_parameters() if n != "weight")
    scorer, enc = _batch(tokenizer, n=2)
    pred = method.predict(model, scorer, enc, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pred.probs).all()


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    method, model, tokenizer = _prepared({"init_lamda": 0.03, "init_sd_u": 0.1})
    scorer, enc = _batch(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    before = method.predict(model, scorer, enc, generator=torch.Generator().manual_seed(3))
    method.save(model, tmp_path)
    fresh = build_method("sgp", method.config.to_dict())
    torch.manual_seed(123)  # a different init of the posterior modules: everything must come from the files
    loaded = fresh.load(build_tiny_llama()[0], tmp_path).eval()
    after = fresh.predict(loaded, scorer, enc, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(before.sample_probs, after.sample_probs, atol=0, rtol=0)


def test_train_and_load_run_through_run_dir(tmp_path):
    from bayeslora.config import TrainConfig
    from bayeslora.runs import load_run
    from bayeslora.train import train

    cfg = TrainConfig(model="tiny-random-llama", dataset="arith", method="sgp", max_steps=2, batch_size=2,
                      train_limit=8, save_every=0, adapter=TINY_ADAPTER)
    run_dir = train(cfg, tmp_path / "run", progress=False)
    examples = load_task("arith", "validation", limit=4)
    p1 = load_run(run_dir).predict(examples, seed=5)
    p2 = load_run(run_dir).predict(examples, seed=5)
    assert p1.n_samples == 4
    torch.testing.assert_close(p1.sample_probs, p2.sample_probs, atol=0, rtol=0)


@pytest.mark.parametrize("options, match", [
    ({"inducing_rows": 0}, "inducing_rows"),
    ({"max_lamda": -1.0}, "max_lamda"),
    ({"init_sd_u": 0.5}, "init_sd_u"),
    ({"targets": []}, "targets"),
    ({"flow_hidden": -2}, "flow_hidden"),
    ({"scale_lr": 0.0}, "scale_lr"),
])
def test_config_errors_name_the_option(options, match):
    with pytest.raises(MethodError, match=match):
        build_method("sgp", options)


def test_missing_targets_is_a_clear_error():
    model, _ = build_tiny_llama()
    method = build_method("sgp", {"targets": "nonexistent_proj"})
    with pytest.raises(Exception, match="nonexistent_proj"):
        method.prepare(model, TINY_ADAPTER)
