"""Count the aten operators one training step dispatches, per method, next to MLE: a proxy for a GPU's launch
cost when a small-batch step is launch-bound (countable on a CPU). Counted at the dispatcher with a
``TorchDispatchMode``, which sees a ``foreach`` optimizer op once, as a GPU launches it (the CPU profiler
counts its per-tensor fallbacks)::

    python scripts/count_step_ops.py --method blob --format letter

Prints, for the forward, KL, backward and optimizer parts of the second step, the dispatched ops and the
"kernels" (ops other than views and host-side scalar reads), and the largest per-op differences from MLE.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bayeslora.bench.speed import SpeedConfig, _batch
from bayeslora.methods import AdapterConfig, build_method
from bayeslora.models import load_model
from bayeslora.scoring import make_scorer

NOT_KERNELS = {"view", "transpose", "t", "slice", "detach", "expand", "_unsafe_view", "reshape", "as_strided",
               "select", "narrow", "lift_fresh", "_local_scalar_dense", "alias", "unsqueeze", "squeeze", "permute",
               "split", "split_with_sizes", "unbind"}
PARTS = ("forward", "kl", "backward", "optimizer")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(method_name: str, args) -> dict[str, collections.Counter]:
    torch.manual_seed(0)
    loaded = load_model(args.model)
    scorer = make_scorer(args.format, loaded.tokenizer, max_length=256)
    config = SpeedConfig(model=args.model, dataset=args.dataset, batch_size=args.batch_size, data_dir=args.data_dir)
    enc = _batch(config, "train", scorer.tokenizer, scorer)
    method = build_method(method_name)
    model = method.prepare(loaded.model, AdapterConfig(target_modules=args.targets.split(",")))
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):  # the second step is counted (the first creates the optimizer state)
        counters = {part: _Count() for part in PARTS}
        with counters["forward"]:
            nll = method.nll(model, scorer, enc, generator)
        with counters["kl"]:
            loss = nll + method.kl_scale(1000) * method.kl()
        with counters["backward"]:
            loss.backward()
        with counters["optimizer"]:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {part: c.ops for part, c in counters.items()}


def _kernels(ops: collections.Counter) -> int:
    return sum(n for op, n in ops.items() if op not in NOT_KERNELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="blob")
    parser.add_argument("--format", default="letter", choices=["letter", "cloze"])
    parser.add_argument("--model", default="random:smollm2-135m")
    parser.add_argument("--targets", default="q_proj,v_proj,lm_head")
    parser.add_argument("--dataset", default="arc-e")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12, help="per-op differences listed per part")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    base, other = count("mle", args), count(args.method, args)
    print(f"{args.model}, {args.format}, batch {args.batch_size}, LoRA on {args.targets}")
    print(f"| part | mle ops | {args.method} ops | mle kernels | {args.method} kernels |\n|---|---|---|---|---|")
    for part in (*PARTS, "total"):
        b = sum(base.values(), collections.Counter()) if part == "total" else base[part]
        o = sum(other.values(), collections.Counter()) if part == "total" else other[part]
        print(f"| {part} | {sum(b.values()):,} | {sum(o.values()):,} ({sum(o.values()) / max(sum(b.values()), 1):.2f}x)"
              f" | {_kernels(b):,} | {_kernels(o):,} ({_kernels(o) / max(_kernels(b), 1):.2f}x) |")
    for part in PARTS:
        diff = {op: other[part][op] - base[part][op] for op in set(base[part]) | set(other[part])}
        top = sorted(((n, op) for op, n in diff.items() if n), key=lambda t: -abs(t[0]))[: args.rows]
        print(f"{part}: " + ", ".join(f"{op} {n:+d}" for n, op in top))


if __name__ == "__main__":
    main()
