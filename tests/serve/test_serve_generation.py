"""Decoding with per-token uncertainty: exactness vs transformers, the S-sample batch and the run's sample plan
(chunks, mean prompt, antithetic pairs), stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.methods import AdapterConfig, MethodError, build_method
from bayeslora.models import build_tiny_llama
from bayeslora.runs import Run
from bayeslora.serve import InferenceService, ServeSettings
from bayeslora.serve.generation import (
    DecodeParams,
    StopMatcher,
    choose_token,
    decode,
    sequence_confidence,
    step_stats,
)
from bayeslora.serve.protocol import ChatCompletionRequest, ChoicesRequest
from bayeslora.serve.service import InvalidRequest



def test_step_stats_matches_hand_computation():
    p1, p2 = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    probs, total, aleatoric, epistemic = step_stats(torch.stack([p1.log(), p2.log()]))
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert torch.allclose(probs, torch.tensor([0.5, 0.5]))
    assert total == pytest.approx(math.log(2), abs=1e-6)
    assert aleatoric == pytest.approx(h, abs=1e-6)
    assert epistemic == pytest.approx(math.log(2) - h, abs=1e-6)
    _, total, aleatoric, epistemic = step_stats(torch.stack([p1.log(), p1.log()]))  # agreeing samples
    assert epistemic == pytest.approx(0.0, abs=1e-6) and total == pytest.approx(aleatoric)


@pytest.mark.parametrize("temperature", [1e-30, 1e-5, 0.01])
def test_choose_token_small_temperatures_pick_the_best_token(temperature):
    """exp(log p / T) underflowed to all zeros below T ~ 0.02 (a 500 on SmolLM2): the softmax form is stable."""
    probs = torch.tensor([0.2, 0.35, 0.3, 0.15])
    g = torch.Generator().manual_seed(0)
    assert all(choose_token(probs, temperature, 1.0, g) == 1 for _ in range(10))


def test_choose_token_greedy_and_nucleus():
    probs = torch.tensor([0.05, 0.7, 0.25])
    g = torch.Generator().manual_seed(0)
    assert choose_token(probs, 0.0, 1.0, g) == 1
    assert all(choose_token(probs, 1.0, 0.5, g) == 1 for _ in range(20))  # nucleus keeps only the top token
    assert {choose_token(probs, 1.0, 0.9, g) for _ in range(200)} == {1, 2}


def test_nucleus_with_a_denormal_top_p_keeps_the_best_token():
    probs = torch.tensor([0.1, 0.6, 0.3])
    assert choose_token(probs, 1.0, 5e-324, torch.Generator().manual_seed(0)) == 1


def test_sequence_confidence_is_geometric_mean():
    assert sequence_confidence([]) == 1.0
    assert sequence_confidence([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert 0.0 <= sequence_confidence([-1e9]) <= 1.0


def test_greedy_decode_equals_transformers_generate(tiny_base_run):
    run = tiny_base_run
    prompt = run.tokenizer("Question: 1+2\nAnswer:", add_special_tokens=False)["input_ids"]
    params = DecodeParams(max_tokens=12, temperature=0.0)
    ours = [s.token_id for s in decode(run.model, run.method, prompt, params, None)]
    ids = torch.tensor([prompt])
    ref = run.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=run.tokenizer.pad_token_id)
    assert ours == ref[0, len(prompt):].tolist()


def test_posterior_samples_decode_as_one_batched_forward(tiny_stochastic_run):
    run = tiny_stochastic_run
    batch_sizes = []
    hook = run.model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        params = DecodeParams(max_tokens=6, temperature=0.0, n_samples=4)
        steps = list(decode(run.model, run.method, [5, 6, 7, 8], params, torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    assert len(steps) == 6 and batch_sizes == [4] * 6  # one forward of S rows per step (prompt + 5 cached steps)
    assert all(s.epistemic > 0 for s in steps)  # the posterior samples disagree
    again = list(decode(run.model, run.method, [5, 6, 7, 8], params, torch.Generator().manual_seed(0)))
    assert [s.token_id for s in again] == [s.token_id for s in steps]  # same seed, same samples
    assert all(abs(a.entropy - b.entropy) < 1e-5 for a, b in zip(again, steps))


def test_deterministic_decode_has_zero_epistemic(tiny_stochastic_run):
    run = tiny_stochastic_run
    steps = list(decode(run.model, run.method, [5, 6, 7], DecodeParams(max_tokens=3, n_samples=1), None))
    assert all(s.epistemic == 0.0 for s in steps)


def test_decode_stops_at_stop_token(tiny_base_run):
    run = tiny_base_run
    first = next(decode(run.model, run.method, [5, 6, 7], DecodeParams(max_tokens=5, temperature=0.0), None))
    params = DecodeParams(max_tokens=5, temperature=0.0, stop_token_ids=frozenset({first.token_id}))
    assert len(list(decode(run.model, run.method, [5, 6, 7], params, None))) == 1


def test_stop_matcher_holds_back_stop_prefixes(tiny_base_run):
    tok = tiny_base_run.tokenizer
    matcher = StopMatcher(tok, ["END"])
    released = []
    for token in tok("abcENDxyz", add_special_tokens=False)["input_ids"]:
        text, stopped = matcher.push(token)
        released.append(text)
        if stopped:
            break
    assert stopped and "".join(released) == "abc" and matcher.text == "abc"
    matcher = StopMatcher(tok, ["END"])
    out = "".join(matcher.push(t)[0] for t in tok("abEN", add_special_tokens=False)["input_ids"])
    assert out == "ab" and matcher.flush() == "EN"


# -- the run's sample plan (prediction options) in generation ------------------------------------------------------
def _decode(run, prompt, S, seed=0, max_tokens=5):
    params = DecodeParams(max_tokens=max_tokens, temperature=0.0, n_samples=S)
    return list(decode(run.model, run.method, prompt, params, torch.Generator().manual_seed(seed)))


def _decode_logged(run, prompt, S):
    """``_decode`` and the (rows, tokens) shape of every forward of ``run.model`` it made."""
    log = []
    hook = run.model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        return _decode(run, prompt, S=S), log
    finally:
        hook.remove()


def test_chunked_decode_equals_one_batch(tiny_stochastic_run, planned):
    whole = _decode(planned(tiny_stochastic_run), [5, 6, 7, 8], S=8)
    run = planned(tiny_stochastic_run, chunk=3)
    chunked, log = _decode_logged(run, [5, 6, 7, 8], S=8)
    assert log[:3] == [(3, 4), (3, 4), (2, 4)] and log[3:6] == [(3, 1), (3, 1), (2, 1)]  # 3 + 3 + 2 rows per step
    assert [s.token_id for s in chunked] == [s.token_id for s in whole]
    for a, b in zip(chunked, whole, strict=True):  # row s keeps sample s across chunks and steps
        assert a.epistemic == pytest.approx(b.epistemic, abs=1e-5) and b.epistemic > 1e-3  # H - E[H]: float32 cancellation
        assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-6)


def test_mean_prompt_runs_the_prompt_once_at_the_mean(tiny_stochastic_run, planned):
    run = planned(tiny_stochastic_run, mean_prompt=True)
    steps, log = _decode_logged(run, [5, 6, 7, 8], S=4)
    # the prompt but its last token: once, one row; then S rows of one token (the last prompt token first)
    assert log == [(1, 3)] + [(4, 1)] * 5
    assert all(s.epistemic > 0 for s in steps)  # the last prompt token and the generated ones are sampled
    full = _decode(planned(tiny_stochastic_run), [5, 6, 7, 8], S=4)
    assert steps[0].epistemic != pytest.approx(full[0].epistemic)  # the prompt's keys and values are the mean's
    # nothing before the last token: the same as sampling every position
    one = _decode(run, [5], S=4)
    assert [(s.token_id, round(s.epistemic, 5)) for s in one] == \
        [(s.token_id, round(s.epistemic, 5)) for s in _decode(planned(tiny_stochastic_run), [5], S=4)]


def test_mean_prompt_equals_full_sampling_when_the_posterior_is_a_point(tiny_point_run, planned):
    point = tiny_point_run
    mean = _decode(planned(point, mean_prompt=True), [5, 6, 7, 8], S=4)
    full = _decode(planned(point), [5, 6, 7, 8], S=4)
    assert [s.token_id for s in mean] == [s.token_id for s in full]
    assert [s.logprob for s in mean] == pytest.approx([s.logprob for s in full], abs=1e-5)


def test_antithetic_decode_draws_mirrored_pairs_and_needs_an_even_S(tiny_stochastic_run, planned, monkeypatch):
    run = planned(tiny_stochastic_run, antithetic=True)
    states = []
    sampling = run.method.sampling

    def spy(*args, **kwargs):
        ctx = sampling(*args, **kwargs)
        states.append(kwargs)
        return ctx

    monkeypatch.setattr(run.method, "sampling", spy)
    steps = _decode(run, [5, 6, 7, 8], S=4)
    assert states == [{"groups": None, "n_groups": 4, "generator": states[0]["generator"], "antithetic": True,
                       "center": False}]
    assert all(s.epistemic > 0 for s in steps)
    with pytest.raises(MethodError, match="mirrored pairs"):
        _decode(run, [5, 6, 7, 8], S=3)
    assert len(_decode(run, [5, 6, 7, 8], S=1)) == 5  # S = 1 is the deterministic forward: nothing to pair


def test_linearized_decode_keeps_the_mean_tokens_and_chunks_alike(tiny_stochastic_run, planned, monkeypatch):
    """A linearized plan decodes S + 1 rows (S/2 mirrored pairs and the mean, one forward per step); the tokens are
    the deterministic decode's, the uncertainty is the samples'; rows in chunks give the same numbers."""
    run = planned(tiny_stochastic_run, linearized=True)
    states, sampling = [], run.method.sampling

    def spy(*args, **kwargs):
        states.append(kwargs)
        return sampling(*args, **kwargs)

    monkeypatch.setattr(run.method, "sampling", spy)
    steps, log = _decode_logged(run, [5, 6, 7, 8], S=4)
    assert states[0]["n_groups"] == 5 and states[0]["antithetic"] and states[0]["center"]
    assert {rows for rows, _ in log} == {5} and len(log) == 5  # one forward of S + 1 rows per step
    plain = _decode(tiny_stochastic_run, [5, 6, 7, 8], S=1)
    assert [s.token_id for s in steps] == [s.token_id for s in plain]
    assert all(s.epistemic > 0 for s in steps)
    chunked = _decode(planned(tiny_stochastic_run, linearized=True, chunk=2), [5, 6, 7, 8], S=4)
    assert [s.epistemic for s in chunked] == pytest.approx([s.epistemic for s in steps], abs=1e-5)  # MI: H - E[H]
    with pytest.raises(MethodError, match="linearized predictive.*mirrored pairs"):
        _decode(run, [5, 6, 7, 8], S=3)


def test_service_refuses_samples_the_plan_cannot_draw(tiny_stochastic_run, planned):
    service = InferenceService(planned(tiny_stochastic_run, antithetic=True), ServeSettings(max_samples=8))
    chat = ChatCompletionRequest(model=service.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                 samples=3)
    with pytest.raises(InvalidRequest, match="mirrored pairs") as err:
        service.chat_completion(chat)
    assert err.value.param == "samples"
    with pytest.raises(InvalidRequest, match="mirrored pairs"):
        service.choose(ChoicesRequest(question="q", choices=["a", "b"], samples=1))
    assert service.chat_completion(chat.model_copy(update={"samples": 4})).choices[0].confidence.n_samples == 4
    # the linearized plan pairs its samples in generation only; the choice predictive takes any S
    linear = InferenceService(planned(tiny_stochastic_run, linearized=True), ServeSettings(max_samples=8))
    with pytest.raises(InvalidRequest, match="mirrored pairs"):
        linear.chat_completion(chat)
    assert linear.choose(ChoicesRequest(question="q", choices=["a", "b"], samples=3)).n_samples == 3


def _tiny_blob(predictive: str, targets: list[str]):
    model, _ = build_tiny_llama(seed=0)
    method = build_method("blob", {"predictive": predictive, "init_eps": 0.7, "n_samples": 4})
    peft_model = method.prepare(model, AdapterConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return method, peft_model.eval()


def test_head_predictive_decodes_one_row_and_equals_sampling_a_head_only_posterior():
    """BLoB ``predictive=head``: one posterior-mean row per step plus S samples of the LM head's LoRA. With the
    head as the only Gaussian layer it is the full MC decode (same noise from the same generator)."""
    method, model = _tiny_blob("head", ["lm_head"])
    params = DecodeParams(max_tokens=5, temperature=0.0, n_samples=4)
    log = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        head = list(decode(model, method, [5, 6, 7, 8], params, torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    assert log == [(1, 4)] + [(1, 1)] * 4  # one row: the samples never reach the trunk
    assert all(s.epistemic > 1e-3 for s in head)
    method.config.predictive = "mc"
    full = list(decode(model, method, [5, 6, 7, 8], params, torch.Generator().manual_seed(0)))
    assert [s.token_id for s in head] == [s.token_id for s in full]
    for a, b in zip(head, full, strict=True):  # sample s keeps one head sample for the whole sequence
        assert a.epistemic == pytest.approx(b.epistemic, abs=1e-5)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_head_predictive_in_generation_needs_a_gaussian_head():
    method, model = _tiny_blob("head", ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="LM head"):
        list(decode(model, method, [5, 6], DecodeParams(max_tokens=2, n_samples=4), torch.Generator()))
    with pytest.raises(MethodError, match="head predictive"):
        build_method("mcd").head_sampler(model, 4)


def test_an_ensemble_decodes_each_member_once():
    """S above the K members would count some members twice in the mean predictive: K rows are decoded."""
    model, _ = build_tiny_llama(seed=0)
    method = build_method("ens", {"n_members": 3})
    model = method.prepare(model, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    log = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: log.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        list(decode(model, method, [5, 6, 7], DecodeParams(max_tokens=2, n_samples=5), torch.Generator()))
    finally:
        hook.remove()
    assert log == [3, 3]
    info = {"model": "tiny-random-llama", "method": "ens", "format": "cloze"}
    run = Run(model=model, tokenizer=build_tiny_llama(seed=0)[1], method=method, scorer=None, info=info)
    service = InferenceService(run, ServeSettings(max_samples=8))
    chat = ChatCompletionRequest(model=service.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                 samples=5)
    assert service.chat_completion(chat).choices[0].confidence.n_samples == 3
    assert service.models().data[0].n_samples == 3  # its default: the 3 members


def test_a_posterior_without_weight_samples_decodes_the_adapter(tiny_stochastic_run, planned):
    """Laplace's plan (no weight samples, ``decodes=False``): generation decodes one row, the adapter's, whatever S,
    and says n_samples 0; a method default above the server's --max-samples is capped (Laplace's is 50 logit
    samples), an explicit request above it refused."""
    assert not build_method("laplace").config.sample_plan().decodes
    run = planned(tiny_stochastic_run, decodes=False)
    steps, log = _decode_logged(run, [5, 6, 7, 8], S=4)
    assert {rows for rows, _ in log} == {1}
    plain = _decode(tiny_stochastic_run, [5, 6, 7, 8], S=1)
    assert [s.token_id for s in steps] == [s.token_id for s in plain] and all(s.epistemic == 0 for s in steps)
    service = InferenceService(run, ServeSettings(max_samples=2))  # the run's default: 4 samples
    assert service.models().data[0].n_samples == 2
    chat = ChatCompletionRequest(model=service.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert service.chat_completion(chat).choices[0].confidence.n_samples == 0
    assert service.choose(ChoicesRequest(question="q", choices=["a", "b"])).n_samples == 2
    with pytest.raises(InvalidRequest, match="max-samples"):
        service.chat_completion(chat.model_copy(update={"samples": 4}))


def test_a_default_sample_count_the_run_cannot_draw_is_refused_at_start(tiny_stochastic_run, planned):
    """An odd default S under antithetic pairs used to start, then fail every request that set no `samples`
    (blaming a parameter the client never sent)."""
    run = planned(tiny_stochastic_run, antithetic=True)
    with pytest.raises(ValueError, match=r"default number of samples \(3\).*mirrored pairs"):
        InferenceService(run, ServeSettings(samples=3, max_samples=8))
    InferenceService(run, ServeSettings(samples=4, max_samples=8))
    with pytest.raises(ValueError, match="max_n"):
        ServeSettings(max_n=17)
