"""Replay the batches of the first H100 lease's bfloat16 NaN (docs/FINDINGS.md, finding 29), with PyTorch's plain
SDPA attention and with bayeslora's (``bayeslora.attention``: no cuDNN kernel where a backward follows)::

    python scripts/attention_nan_replay.py --lengths              # which steps of the gpu-arc-e grid hit the bug
    python scripts/attention_nan_replay.py --dtype bfloat16 --model $SMOLLM2   # on a GPU: the NaN batch

``--lengths`` lists, for the grid's letter-format training batches (400 steps of 16, seeds 1-3: the order of
``bayeslora.train.batch_indices``) and Laplace's curvature batches of that lease (500 training questions drawn with
the seed, batches of 8), those whose left-padded length is 64 modulo 128, the lengths at which cuDNN's attention
backward returns NaN query gradients (PyTorch issue 196678). Without it: one MLE LoRA step's forward and backward
on seed 1's step-316 batch (the one such batch in training; the loss read NaN at step 317), in ``--dtype`` on the
default device, printing whether the loss and the LoRA gradients are finite under each attention. On the CPU both
are finite (no cuDNN there); on an H100 with torch >= 2.11 in bfloat16 the plain SDPA row is expected to show NaN.
"""

from __future__ import annotations

import argparse

import torch

from bayeslora.methods import AdapterConfig, build_method
from bayeslora.models import load_model, parse_dtype
from bayeslora.scoring import make_scorer
from bayeslora.tasks import load_task
from bayeslora.train import batch_indices

STEPS, BATCH, MAX_LENGTH = 400, 16, 256  # preset gpu-arc-e
FIT_QUESTIONS, FIT_BATCH = 500, 8  # Laplace's curvature on the first lease (n_fit 500, bayesianize's batch)
NAN_SEED, NAN_STEP = 1, 316  # 1-based, as the training loop names steps


def bad_length(n: int) -> bool:
    return n % 128 == 64


def report_lengths(lengths: list[int]) -> None:
    print(f"{len(lengths)} training questions, letter prompts of {min(lengths)}-{max(lengths)} tokens")
    for seed in (1, 2, 3):
        train = [s + 1 for s in range(STEPS)
                 if bad_length(max(lengths[i] for i in batch_indices(len(lengths), BATCH, seed, s)))]
        pick = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))[:FIT_QUESTIONS]
        pick = pick.sort().values.tolist()
        fit = [b for b, start in enumerate(range(0, FIT_QUESTIONS, FIT_BATCH))
               if bad_length(max(lengths[i] for i in pick[start:start + FIT_BATCH]))]
        print(f"seed {seed}: training steps of padded length 64 mod 128: {train or 'none'}; "
              f"Laplace curvature batches: {fit or 'none'}")


def step_is_finite(model_spec: str | None, attn: str, dtype: torch.dtype, examples) -> tuple[bool, bool]:
    loaded = load_model(model_spec, dtype=dtype)
    loaded.model.set_attn_implementation(attn)
    scorer = make_scorer("letter", loaded.tokenizer, max_length=MAX_LENGTH)
    method = build_method("mle")
    model = method.prepare(loaded.model, AdapterConfig())
    model.train()
    device = next(model.parameters()).device
    enc = scorer.encode(examples).to(device)
    loss = method.nll(model, scorer, enc, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    print(f"  padded length {enc.input_ids.shape[1]}, device {device}, dtype {loaded.model.dtype}")
    return bool(torch.isfinite(loss)), all(bool(torch.isfinite(g).all()) for g in grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", action="store_true", help="only list the batches of a bad length")
    parser.add_argument("--model", default=None, help="base model spec (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    train = load_task("arc-e", "train", args.data_dir)
    if args.lengths:
        tokenizer = load_model(args.model).tokenizer
        scorer = make_scorer("letter", tokenizer, max_length=MAX_LENGTH)
        report_lengths([len(scorer.encode([ex]).input_ids[0]) for ex in train])
        return
    examples = [train[i] for i in batch_indices(len(train), BATCH, NAN_SEED, NAN_STEP - 1)]
    from bayeslora.attention import SAFE_SDPA
    for attn in ("sdpa", SAFE_SDPA):
        print(f"{attn}:")
        loss_ok, grads_ok = step_is_finite(args.model, attn, parse_dtype(args.dtype), examples)
        print(f"  loss finite: {loss_ok}; LoRA gradients finite: {grads_ok}")


if __name__ == "__main__":
    main()
