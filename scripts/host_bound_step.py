"""BLoB's (or another method's) training step next to MLE's on a *host-bound* model: the Llama-2-7B layer count
(32) at width 64, so that every op costs its dispatch, as on a launch-bound GPU. One process, the methods taking
turns step by step; the letter and the cloze formats::

    python scripts/host_bound_step.py                 # median step times and ratios
    python scripts/host_bound_step.py --trace cloze   # ops of one step that would wait on a GPU

``--trace`` runs one step of each method under a dispatch mode and lists, with the Python lines that called them,
the operators that would make a GPU's host wait or copy: scalar reads, ops whose output size depends on the data,
tensors made from host data, and factory calls without a device (on a GPU, host tensors). On the CPU none of these
cost anything, so this finds candidates that a CPU timing cannot (FINDINGS, finding 31).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bayeslora import models
from bayeslora.bench.speed import SpeedConfig, _batch
from bayeslora.methods import AdapterConfig, build_method
from bayeslora.scoring import make_scorer

SPEC = "random:host-proxy"
models.RANDOM_ARCHITECTURES["host-proxy"] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)

SCALAR_READS = {"_local_scalar_dense", "item"}
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "randn", "rand", "randint", "scalar_tensor", "eye",
             "linspace"}


def make_step(method_name: str, fmt: str, batch_size: int, data_dir: str | None):
    torch.manual_seed(0)
    loaded = models.load_model(SPEC)
    scorer = make_scorer(fmt, loaded.tokenizer, max_length=256)
    config = SpeedConfig(model=SPEC, batch_size=batch_size, data_dir=data_dir)
    enc = _batch(config, "train", scorer.tokenizer, scorer)
    method = build_method(method_name)
    model = method.prepare(loaded.model, AdapterConfig())
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        loss = method.nll(model, scorer, enc, generator) + method.kl_scale(1000) * method.kl()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class _WaitCandidates(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        kind = None
        if name in SCALAR_READS:
            kind = "scalar read"
        elif name in DATA_DEPENDENT or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            kind = "data-dependent size"
        elif name.startswith("lift_fresh"):
            kind = "tensor from host data"
        elif name in FACTORIES and kwargs.get("device") is None:
            kind = "factory without device"
        if kind:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "torch/utils" not in f.filename and "torch/_ops" not in f.filename
                      and "_dynamo" not in f.filename and "torch/_compile" not in f.filename]
            where = " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames[::-1][:3])
            self.hits[(kind, name, where)] += 1
        return func(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="blob")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", choices=["letter", "cloze"], help="list wait candidates instead of timing")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["mle", args.method]
    if args.trace:
        for name in names:
            step = make_step(name, args.trace, args.batch_size, args.data_dir)
            step()
            mode = _WaitCandidates()
            with mode:
                step()
            print(f"## {name} ({args.trace}): {sum(mode.hits.values())} candidate ops in one step")
            for (kind, op, where), n in sorted(mode.hits.items(), key=lambda kv: -kv[1]):
                print(f"  {n:4d} x {kind}: {op} | {where}")
        return
    for fmt in ("letter", "cloze"):
        steps = {name: make_step(name, fmt, args.batch_size, args.data_dir) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        for name in names:
            steps[name]()
        for _ in range(args.rounds):
            for name in names:
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"{fmt}: " + ", ".join(f"{n} {median[n] * 1e3:.1f} ms" for n in names)
              + f"; {args.method} / mle {median[args.method] / median['mle']:.2f}x over {args.rounds} rounds")


if __name__ == "__main__":
    main()
