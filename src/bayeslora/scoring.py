"""Turn multiple-choice examples into choice logits ``(B, C)`` with a causal LM.

Two formats (see :mod:`bayeslora.tasks.base` for the templates):

``letter``
    One row per question. The logits at the last position, restricted to the label tokens ``" A"``, ``" B"``..,
    are the choice logits (the BLoB / Laplace-LoRA protocol).
``cloze``
    One row per (question, choice). A choice's logit is the log-likelihood of its continuation given its context,
    divided by the continuation's token count (``normalize="token"``, default) or not (``"none"``). All choices of
    a batch go through one forward.

Absent choices (a question with fewer choices than the batch's ``C``) get logit ``-inf``, hence probability 0.
Rows are left-padded and position ids follow the attention mask, so a question scores the same alone or in a batch.
Only the positions that are needed go through the LM head (``logits_to_keep``), never the whole sequence.

:meth:`ChoiceScorer.mean_prompt_logits` scores ``S`` weight samples with the prompt at the posterior mean: the
positions before the scored ones run once, deterministically, and their KV cache is shared by the ``S`` samples,
which run only the scored positions (letter: the last token; cloze: the continuations and the context's last token).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import Enum

import torch

from .hf_compat import cache_kwargs, returned_cache
from .peft_ext import row_questions
from .tasks.base import LETTERS, MCExample


class ChoiceFormat(str, Enum):
    """How a question is scored."""

    LETTER = "letter"
    """Prompt lists the labelled choices; next-token logits of the label letters."""
    CLOZE = "cloze"
    """Each choice's text scored by its length-normalized log-likelihood as a continuation."""


@dataclass
class EncodedBatch:
    """Token tensors for ``B`` questions spread over ``R`` rows (``R = B`` for letter, ``sum(C_b)`` for cloze)."""

    input_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T)
    row_question: torch.Tensor  # (R,) question index of each row
    row_choice: torch.Tensor  # (R,) choice index of each row (cloze), 0 for letter
    target_ids: torch.Tensor  # (R, K) right-aligned continuation tokens (cloze), (R, 0) for letter
    target_mask: torch.Tensor  # (R, K)
    choice_mask: torch.Tensor  # (B, C) True where the choice exists
    labels: torch.Tensor  # (B,)
    # cloze with one context per question: the context once per question + the continuations (shared prefix);
    # empty (0, 0) tensors when not used
    prefix_ids: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))  # (B, Tp)
    prefix_mask: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))  # (B, Tp)
    cont_ids: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))  # (R, Tc)
    cont_mask: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))  # (R, Tc)

    @property
    def shared_prefix(self) -> bool:
        return self.prefix_ids.numel() > 0

    @property
    def n_questions(self) -> int:
        return self.choice_mask.shape[0]

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def rows_are_questions(self) -> bool:
        """Row ``i`` is question ``i`` (letter format; cloze with one choice per question). Decided from shapes
        alone, without reading ``row_question`` back from the device: the encoders and :meth:`repeat` give every
        question at least one row and keep the rows in question order, so ``R == B`` means the identity."""
        return self.n_rows == self.n_questions

    @property
    def row_map(self) -> torch.Tensor | None:
        """``row_question`` for :func:`~bayeslora.peft_ext.row_questions`, ``None`` for the identity: the stochastic
        layers then use their per-question noise as it is (no gather in the forward, no scatter in the backward)."""
        return None if self.rows_are_questions else self.row_question

    def one_pass(self) -> EncodedBatch:
        """The same batch without the shared-prefix layout: every row is scored in one forward (for code that hooks
        a layer's per-row inputs and outputs, which must see each row once)."""
        empty = torch.zeros((0, 0), dtype=torch.long, device=self.input_ids.device)
        return replace(self, prefix_ids=empty, prefix_mask=empty, cont_ids=empty, cont_mask=empty)

    def for_autograd(self) -> EncodedBatch:
        """The batch with tensors made under ``torch.inference_mode()`` cloned into normal ones (call it where
        autograd is on): a differentiated pass may save one of them (an index) for its backward."""
        if not any(getattr(self, f.name).is_inference() for f in fields(self)):
            return self
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device: torch.device | str) -> EncodedBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def repeat(self, n: int) -> EncodedBatch:
        """``n`` copies of the batch, sample-major: question ``s * B + b`` is copy ``s`` of question ``b``."""
        B = self.n_questions
        offsets = (torch.arange(n, device=self.row_question.device) * B).repeat_interleave(self.n_rows)
        rep = lambda t: t.repeat(n, 1) if t.numel() else t  # noqa: E731
        return EncodedBatch(
            input_ids=self.input_ids.repeat(n, 1),
            attention_mask=self.attention_mask.repeat(n, 1),
            row_question=self.row_question.repeat(n) + offsets,
            row_choice=self.row_choice.repeat(n),
            target_ids=self.target_ids.repeat(n, 1),
            target_mask=self.target_mask.repeat(n, 1),
            choice_mask=self.choice_mask.repeat(n, 1),
            labels=self.labels.repeat(n),
            prefix_ids=rep(self.prefix_ids),
            prefix_mask=rep(self.prefix_mask),
            cont_ids=rep(self.cont_ids),
            cont_mask=rep(self.cont_mask),
        )


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _capture_inputs(module: torch.nn.Module | None):
    """Collect the first input of each forward call of ``module`` (nothing when ``module`` is None)."""
    inputs: list[torch.Tensor] = []
    if module is None:
        yield inputs
        return
    handle = module.register_forward_hook(lambda mod, args, output: inputs.append(args[0]))
    try:
        yield inputs
    finally:
        handle.remove()


class ChoiceScorer:
    """Base class: encode examples, run the model, return choice logits ``(B, C)``."""

    format: ChoiceFormat

    def __init__(self, tokenizer, max_length: int = 512):
        if max_length < 8:
            raise ValueError(f"Expected `max_length` to be at least 8 tokens, but got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._cut_reported = False

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _report_cut(self, example: MCExample, n_tokens: int) -> None:
        """Warn (once per scorer) that a question is longer than ``max_length`` and loses its prompt's start."""
        if not self._cut_reported:
            self._cut_reported = True
            warnings.warn(f"Question {example.id!r} has {n_tokens} tokens, more than max_length={self.max_length}: "
                          "its prompt is cut from the left (later cuts are not reported; a larger --max-length "
                          "keeps whole prompts)", stacklevel=3)

    def encode(self, examples: list[MCExample], n_choices: int | None = None) -> EncodedBatch:
        raise NotImplementedError

    def n_keep(self, enc: EncodedBatch) -> int:
        """How many trailing positions need LM-head logits."""
        raise NotImplementedError

    def logits_from_vocab(self, vocab_logits: torch.Tensor, enc: EncodedBatch) -> torch.Tensor:
        """Choice logits ``(B, C)`` from the trailing vocabulary logits ``(R, n_keep, V)``."""
        raise NotImplementedError

    def forward_vocab(self, model, enc: EncodedBatch, capture: torch.nn.Module | None = None):
        """Run ``model`` and return vocabulary logits of the trailing positions ``(R, n_keep, V)``.

        With ``capture`` (the LM head module), also return its inputs at the same positions ``(R, n_keep, H)``, so
        a predictive can perturb the head alone without a second trunk forward.
        """
        with row_questions(model, enc.row_map), _capture_inputs(capture) as inputs:
            out = model(
                input_ids=enc.input_ids,
                attention_mask=enc.attention_mask,
                position_ids=position_ids(enc.attention_mask),
                logits_to_keep=self.n_keep(enc),
                use_cache=False,
            )
        return out.logits if capture is None else (out.logits, inputs[0])

    def choice_logits(self, model, enc: EncodedBatch) -> torch.Tensor:
        """Choice logits ``(B, C)``, ``-inf`` at absent choices."""
        return self.logits_from_vocab(self.forward_vocab(model, enc), enc)

    def mean_prompt_logits(self, model, enc: EncodedBatch, n_copies: int,
                           sampling: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Choice logits ``(S, B, C)`` of ``n_copies`` = S weight samples that share one prompt pass.

        The positions before the ``n_keep`` scored ones run once, outside any sampling context (a stochastic layer
        is then its posterior mean), with their KV cache kept; the cache is repeated S times and the scored
        positions of ``enc.repeat(S)`` run on it inside ``sampling()`` (question ``s * B + b`` is sample ``s`` of
        question ``b``, as in a batched MC predictive). Cost: one prompt pass plus S passes over ``n_keep``
        positions, instead of S whole forwards.
        """
        R, T = enc.input_ids.shape
        W = self.n_keep(enc)
        rep = enc.repeat(n_copies)
        if W >= T:  # nothing before the scored positions: every position is sampled
            with sampling():
                return self.choice_logits(model, rep).view(n_copies, enc.n_questions, -1)
        cut = T - W
        pre = model(input_ids=enc.input_ids[:, :cut], attention_mask=enc.attention_mask[:, :cut],
                    position_ids=position_ids(enc.attention_mask)[:, :cut], use_cache=True, logits_to_keep=1)
        cache = returned_cache(pre)
        cache.reorder_cache(torch.arange(R, device=enc.input_ids.device).repeat(n_copies))
        with sampling(), row_questions(model, rep.row_map):
            out = model(input_ids=rep.input_ids[:, cut:], attention_mask=rep.attention_mask,
                        position_ids=position_ids(rep.attention_mask)[:, cut:], **cache_kwargs(model, cache),
                        use_cache=True, logits_to_keep=W)
        return self.logits_from_vocab(out.logits, rep).view(n_copies, enc.n_questions, -1)


def _choice_mask(examples: list[MCExample], n_choices: int | None) -> torch.Tensor:
    C = n_choices or max(ex.n_choices for ex in examples)
    if any(ex.n_choices > C for ex in examples):
        raise ValueError(f"A question has more choices than `n_choices`={C}")
    mask = torch.zeros((len(examples), C), dtype=torch.bool)
    for b, ex in enumerate(examples):
        mask[b, : ex.n_choices] = True
    return mask


class LetterScorer(ChoiceScorer):
    format = ChoiceFormat.LETTER

    def __init__(self, tokenizer, max_length: int = 512):
        super().__init__(tokenizer, max_length)
        self.label_token_ids = [self._label_token(letter) for letter in LETTERS]
        self._label_ids_on: dict[torch.device, torch.Tensor] = {}

    def _label_ids(self, device: torch.device) -> torch.Tensor:
        """The label tokens as a tensor on ``device``, copied there once (a host-to-device copy per forward would
        make the host wait on an accelerator)."""
        if device not in self._label_ids_on:
            self._label_ids_on[device] = torch.tensor(self.label_token_ids, device=device)
        return self._label_ids_on[device]

    def _label_token(self, letter: str) -> int:
        # " A" is one token in most LLM vocabularies; a byte-level test tokenizer only has "A".
        for text in (f" {letter}", letter):
            ids = self._ids(text)
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"The tokenizer has no single token for the label {letter!r}: use --format cloze")

    def encode(self, examples: list[MCExample], n_choices: int | None = None) -> EncodedBatch:
        rows = []
        for ex in examples:
            ids = self._ids(ex.prompt)
            if len(ids) > self.max_length:
                self._report_cut(ex, len(ids))
            rows.append(ids[-self.max_length:])
        ids, mask = _left_pad(rows, self.tokenizer.pad_token_id)
        B = len(examples)
        return EncodedBatch(
            input_ids=ids,
            attention_mask=mask,
            row_question=torch.arange(B),
            row_choice=torch.zeros(B, dtype=torch.long),
            target_ids=torch.zeros((B, 0), dtype=torch.long),
            target_mask=torch.zeros((B, 0), dtype=torch.bool),
            choice_mask=_choice_mask(examples, n_choices),
            labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
        )

    def n_keep(self, enc: EncodedBatch) -> int:
        return 1

    def logits_from_vocab(self, vocab_logits: torch.Tensor, enc: EncodedBatch) -> torch.Tensor:
        C = enc.choice_mask.shape[1]
        logits = vocab_logits[:, -1, :].index_select(-1, self._label_ids(vocab_logits.device)[:C])  # (B, C)
        # rows are questions, in order
        return logits.float().masked_fill(~enc.choice_mask, float("-inf"))


class ClozeScorer(ChoiceScorer):
    format = ChoiceFormat.CLOZE

    def __init__(self, tokenizer, max_length: int = 512, normalize: str = "token", share_prefix: bool = True):
        super().__init__(tokenizer, max_length)
        if normalize not in ("token", "none"):
            raise ValueError(f"Expected `normalize` to be 'token' or 'none', but got {normalize!r}")
        self.normalize = normalize
        # Run a context shared by all choices of a question once and the continuations on its KV cache:
        # ~C times fewer tokens when contexts are long and answers short (ARC, OBQA, BoolQ, the built-in task).
        self.share_prefix = share_prefix

    def encode(self, examples: list[MCExample], n_choices: int | None = None) -> EncodedBatch:
        rows, targets, row_q, row_c = [], [], [], []
        for b, ex in enumerate(examples):
            for c, (context, continuation) in enumerate(ex.cloze):
                full_cont, full_ctx = self._ids(continuation), self._ids(context)
                if len(full_ctx) + len(full_cont) > self.max_length:
                    self._report_cut(ex, len(full_ctx) + len(full_cont))
                cont = full_cont[: self.max_length - 1]
                if not cont:
                    raise ValueError(f"Example {ex.id!r}: choice {c} has an empty continuation")
                ctx = full_ctx[-(self.max_length - len(cont)):]
                rows.append(ctx + cont)
                targets.append(cont)
                row_q.append(b)
                row_c.append(c)
        ids, mask = _left_pad(rows, self.tokenizer.pad_token_id)
        prefix = self._shared_prefix(rows, targets, row_q, len(examples))
        K = max(len(t) for t in targets)
        target_ids = torch.zeros((len(rows), K), dtype=torch.long)
        target_mask = torch.zeros((len(rows), K), dtype=torch.bool)
        for r, t in enumerate(targets):
            target_ids[r, K - len(t):] = torch.tensor(t)
            target_mask[r, K - len(t):] = True
        return EncodedBatch(
            input_ids=ids,
            attention_mask=mask,
            row_question=torch.tensor(row_q),
            row_choice=torch.tensor(row_c),
            target_ids=target_ids,
            target_mask=target_mask,
            choice_mask=_choice_mask(examples, n_choices),
            labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
            **prefix,
        )

    def _shared_prefix(self, rows, targets, row_q, n_questions) -> dict:
        """Prefix/continuation tensors when every question's rows share one context (else nothing)."""
        if not self.share_prefix:
            return {}
        contexts: dict[int, list[int]] = {}
        for row, target, q in zip(rows, targets, row_q, strict=True):
            ctx = row[: len(row) - len(target)]
            if not ctx or contexts.setdefault(q, ctx) != ctx:
                return {}
        prefix_ids, prefix_mask = _left_pad([contexts[q] for q in range(n_questions)], self.tokenizer.pad_token_id)
        width = max(len(t) for t in targets)
        cont_ids = torch.full((len(targets), width), self.tokenizer.pad_token_id, dtype=torch.long)
        cont_mask = torch.zeros((len(targets), width), dtype=torch.long)
        for r, t in enumerate(targets):  # right-padded: padding after the real tokens cannot affect them
            cont_ids[r, : len(t)] = torch.tensor(t)
            cont_mask[r, : len(t)] = 1
        return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "cont_ids": cont_ids, "cont_mask": cont_mask}

    def forward_vocab(self, model, enc: EncodedBatch, capture: torch.nn.Module | None = None):
        if not enc.shared_prefix:
            return super().forward_vocab(model, enc, capture)
        return self._forward_shared(model, enc, capture)

    def _forward_shared(self, model, enc: EncodedBatch, capture: torch.nn.Module | None = None):
        """Prefix pass (one row per question, KV cache kept) then continuation pass on the cache, gathered into
        the same right-aligned ``(R, K + 1, V)`` layout as the one-pass forward."""
        with row_questions(model, None), _capture_inputs(capture) as pre_in:  # one row per question
            pre = model(input_ids=enc.prefix_ids, attention_mask=enc.prefix_mask,
                        position_ids=position_ids(enc.prefix_mask), use_cache=True, logits_to_keep=1)
        cache = returned_cache(pre)
        cache.reorder_cache(enc.row_question)
        mask = torch.cat([enc.prefix_mask[enc.row_question], enc.cont_mask], dim=1)
        start = enc.prefix_mask.sum(-1)[enc.row_question, None]
        cont_pos = start + torch.arange(enc.cont_ids.shape[1], device=start.device)[None]
        with row_questions(model, enc.row_map), _capture_inputs(capture) as cont_in:
            out = model(input_ids=enc.cont_ids, attention_mask=mask, position_ids=cont_pos, **cache_kwargs(model, cache),
                        use_cache=True, logits_to_keep=0)

        def align(first: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
            return _right_align(torch.cat([first[enc.row_question, -1:, :], rest], dim=1), enc)

        vocab = align(pre.logits, out.logits)
        return vocab if capture is None else (vocab, align(pre_in[0], cont_in[0]))

    def mean_prompt_logits(self, model, enc: EncodedBatch, n_copies: int,
                           sampling: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """With one context per question: the contexts but their last token run once, at the posterior mean
        (``B`` rows); the S samples run the context's last token and the continuations (``S * R`` rows)."""
        if not enc.shared_prefix or enc.prefix_ids.shape[1] < 2:
            return super().mean_prompt_logits(model, enc.one_pass(), n_copies, sampling)
        rep = enc.repeat(n_copies)
        question = enc.row_question.repeat(n_copies)  # the prefix row (question) of each of the S * R rows
        pre_mask = enc.prefix_mask[:, :-1]
        pre = model(input_ids=enc.prefix_ids[:, :-1], attention_mask=pre_mask, position_ids=position_ids(pre_mask),
                    use_cache=True, logits_to_keep=1)
        cache = returned_cache(pre)
        cache.reorder_cache(question)
        ids = torch.cat([enc.prefix_ids[question, -1:], rep.cont_ids], dim=1)  # (S * R, 1 + Tc)
        mask = torch.cat([enc.prefix_mask[question], rep.cont_mask], dim=1)
        # left padding: the context's last token sits at position (its real tokens before it) = pre_mask.sum
        pos = pre_mask.sum(-1)[question, None] + torch.arange(ids.shape[1], device=ids.device)[None]
        with sampling(), row_questions(model, rep.row_map):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True,
                        logits_to_keep=0)
        return self.logits_from_vocab(_right_align(out.logits, rep), rep).view(n_copies, enc.n_questions, -1)

    def n_keep(self, enc: EncodedBatch) -> int:
        # position t predicts token t + 1: the K targets need the K positions before the last token too
        return enc.target_ids.shape[1] + 1

    def logits_from_vocab(self, vocab_logits: torch.Tensor, enc: EncodedBatch) -> torch.Tensor:
        logprobs = torch.log_softmax(vocab_logits[:, :-1, :].float(), dim=-1)  # (R, K, V)
        token_lp = logprobs.gather(-1, enc.target_ids.unsqueeze(-1)).squeeze(-1)  # (R, K)
        token_lp = token_lp.masked_fill(~enc.target_mask, 0.0)
        score = token_lp.sum(-1)
        if self.normalize == "token":
            score = score / enc.target_mask.sum(-1).clamp(min=1)
        B, C = enc.choice_mask.shape
        logits = torch.full((B, C), float("-inf"), device=score.device, dtype=score.dtype)
        logits[enc.row_question, enc.row_choice] = score
        return logits


def _right_align(left: torch.Tensor, enc: EncodedBatch) -> torch.Tensor:
    """``(R, Tc + 1, D)`` per-row left-aligned outputs of a continuation pass ([the position predicting
    continuation token 0, 1, ..., the last token], right padding after) to the one-pass layout ``(R, K + 1, D)``:
    output position k takes left position ``length - K + k`` (the last one is unused by scoring)."""
    lengths = enc.cont_mask.sum(-1)  # (R,)
    K = enc.target_ids.shape[1]
    idx = (lengths[:, None] - K + torch.arange(K + 1, device=lengths.device)[None]).clamp(min=0)
    return left.gather(1, idx[:, :, None].expand(-1, -1, left.shape[-1]))


SCORERS: dict[ChoiceFormat, type[ChoiceScorer]] = {
    ChoiceFormat.LETTER: LetterScorer,
    ChoiceFormat.CLOZE: ClozeScorer,
}


def make_scorer(fmt: str | ChoiceFormat, tokenizer, max_length: int = 512) -> ChoiceScorer:
    try:
        fmt = ChoiceFormat(fmt)
    except ValueError:
        raise ValueError(f"Expected `format` to be one of {[f.value for f in ChoiceFormat]}, but got {fmt!r}") from None
    return SCORERS[fmt](tokenizer, max_length=max_length)
