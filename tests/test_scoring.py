from __future__ import annotations

import pytest
import torch

from bayeslora.scoring import ClozeScorer, LetterScorer, make_scorer
from bayeslora.tasks.base import MCExample, qa_example


def _mixed():
    return [qa_example("a", "Pick one", ["x", "yy", "zzz"], 1),
            qa_example("b", "A longer question with more words?", ["one", "two", "three", "four", "five"], 4)]


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_absent_choices_get_zero_probability(tiny, fmt):
    scorer = make_scorer(fmt, tiny.tokenizer)
    enc = scorer.encode(_mixed(), n_choices=5)
    with torch.no_grad():
        logits = scorer.choice_logits(tiny.model, enc)
    assert logits.shape == (2, 5)
    assert torch.isinf(logits[0, 3:]).all() and torch.isfinite(logits[1]).all()
    assert torch.allclose(logits.softmax(-1).sum(-1), torch.ones(2))


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_batch_invariance(tiny, fmt):
    """Left padding + position ids from the mask: a question scores the same alone or in a batch."""
    scorer = make_scorer(fmt, tiny.tokenizer)
    examples = _mixed()
    with torch.no_grad():
        both = scorer.choice_logits(tiny.model, scorer.encode(examples, 5))
        alone = scorer.choice_logits(tiny.model, scorer.encode(examples[:1], 5))
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_shared_prefix_matches_one_pass(tiny, arith_examples):
    one = ClozeScorer(tiny.tokenizer, share_prefix=False)
    two = ClozeScorer(tiny.tokenizer)
    examples = arith_examples + _mixed()
    e1, e2 = one.encode(examples, 5), two.encode(examples, 5)
    assert e2.shared_prefix and not e1.shared_prefix
    with torch.no_grad():
        l1, l2 = one.choice_logits(tiny.model, e1), two.choice_logits(tiny.model, e2)
    assert torch.allclose(l1.nan_to_num(), l2.nan_to_num(), atol=1e-5)
    # repeat keeps the prefix layout
    with torch.no_grad():
        l3 = two.choice_logits(tiny.model, e2.repeat(2))
    assert torch.allclose(l3[: len(examples)].nan_to_num(), l2.nan_to_num(), atol=1e-5)


def test_cloze_falls_back_without_shared_context(tiny):
    ex = MCExample("w", ("x", "y"), 0, "p Answer:", (("The cat x", " sat."), ("The cat y", " sat.")))
    enc = ClozeScorer(tiny.tokenizer).encode([ex])
    assert not enc.shared_prefix
    with torch.no_grad():
        assert torch.isfinite(ClozeScorer(tiny.tokenizer).choice_logits(tiny.model, enc)).all()


def test_cloze_score_is_normalized_log_likelihood(tiny):
    """Cross-check the cloze score against a direct full-sequence computation."""
    scorer = ClozeScorer(tiny.tokenizer, share_prefix=False)
    ex = qa_example("q", "2+2", ["4", "five"], 0)
    with torch.no_grad():
        logits = scorer.choice_logits(tiny.model, scorer.encode([ex]))
        for c, (ctx, cont) in enumerate(ex.cloze):
            ctx_ids = tiny.tokenizer(ctx, add_special_tokens=False)["input_ids"]
            cont_ids = tiny.tokenizer(cont, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx_ids + cont_ids])
            lp = tiny.model(input_ids=ids).logits.log_softmax(-1)[0]
            ref = sum(lp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids)) / len(cont_ids)
            assert logits[0, c].item() == pytest.approx(ref, abs=1e-4)


def test_letter_uses_label_tokens(tiny):
    scorer = LetterScorer(tiny.tokenizer)
    assert len(set(scorer.label_token_ids)) == len(scorer.label_token_ids)


def test_left_truncation_keeps_the_answer_cue(tiny):
    scorer = make_scorer("letter", tiny.tokenizer, max_length=16)
    enc = scorer.encode([qa_example("long", "word " * 100, ["a", "b"], 0)])
    assert enc.input_ids.shape[1] == 16
    assert tiny.tokenizer.decode(enc.input_ids[0]).endswith("Answer:")


def test_bad_format_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="format"):
        make_scorer("essay", tiny.tokenizer)


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_a_question_longer_than_max_length_is_reported_once(tiny, fmt):
    scorer = make_scorer(fmt, tiny.tokenizer, max_length=16)
    long = qa_example("long", "word " * 40, ["a", "b"], 0)
    with pytest.warns(UserWarning, match="'long' has .* tokens, more than max_length=16"):
        scorer.encode([long])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.encode([long])  # once per scorer
        make_scorer(fmt, tiny.tokenizer, max_length=256).encode([long])  # fits: nothing to report
