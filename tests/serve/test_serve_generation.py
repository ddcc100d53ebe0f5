"""Decoding with per-token uncertainty: exactness vs transformers, the S-sample batch, stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from bayeslora.serve.generation import (
    DecodeParams,
    StopMatcher,
    choose_token,
    decode,
    sequence_confidence,
    step_stats,
)


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
