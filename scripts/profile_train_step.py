"""Where a method's training step spends its time, next to MLE on the same LoRA targets (issue 5: sgp's step
ratio). One process, one model load per method, the batch of ``bayeslora bench speed``::

    python scripts/profile_train_step.py --method sgp --targets q_proj,k_proj,v_proj,lm_head

Prints the median step time of MLE and of the method over ``--steps`` steps (after one warm-up), their ratio,
the aten operators dispatched in one profiled step, and its top operators (self CPU time, call counts; on CUDA
also by device time, the runtime calls that wait or copy, and the lines that called a synchronizing operation in
one step under ``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import torch

from bayeslora.bench.speed import SpeedConfig, _batch
from bayeslora.methods import AdapterConfig, build_method
from bayeslora.models import load_model
from bayeslora.scoring import make_scorer


def profile(method_name: str, targets: list[str], config: SpeedConfig, steps: int, rows: int,
            fmt: str = "cloze") -> float:
    torch.manual_seed(0)
    loaded = load_model(config.model)
    scorer = make_scorer(fmt, loaded.tokenizer, max_length=256)
    device = next(loaded.model.parameters()).device
    enc = _batch(config, "train", scorer.tokenizer, scorer).to(device)
    method = build_method(method_name)
    model = method.prepare(loaded.model, AdapterConfig(target_modules=targets))
    optimizer = torch.optim.AdamW(method.param_groups(model), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        loss = method.nll(model, scorer, enc, generator) + method.kl_scale(1000) * method.kl().to(device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile() as prof:
        step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    print(f"\n## {method_name}: median step {statistics.median(times):.3f} s over {steps} steps "
          f"({', '.join(f'{t:.2f}' for t in times)}), {trainable:,} trainable parameters, {n_ops:,} aten ops "
          "dispatched in the profiled step (each a kernel launch or more on a GPU, views aside)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows))
        # what makes the host wait for the GPU: runtime calls that synchronize or copy, and (sync debug mode) the
        # Python lines of the step that called a synchronizing operation
        waits = [e for e in prof.key_averages() if any(w in e.key for w in ("Synchronize", "Memcpy", "cudaFree",
                                                                              "cudaMalloc", "cudaHostAlloc"))]
        print("runtime calls that wait or copy: " + (", ".join(f"{e.key} x{e.count} ({e.cpu_time_total / 1e3:.1f} "
                                                              "ms)" for e in waits) or "none"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        lines = collections.Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught)
        print("synchronizing operations in one step: " + ("none" if not lines else ""))
        for line, n in lines.most_common():
            print(f"  {n} x {line}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="sgp")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,lm_head", help="LoRA targets of both methods")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="arc-e")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=15, help="operators listed per profile")
    parser.add_argument("--format", default="cloze", choices=["cloze", "letter"])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    config = SpeedConfig(model=args.model, dataset=args.dataset, batch_size=args.batch_size, data_dir=args.data_dir)
    targets = [t for t in args.targets.split(",") if t]
    base = profile("mle", targets, config, args.steps, args.rows, args.format)
    other = profile(args.method, targets, config, args.steps, args.rows, args.format)
    print(f"\n{args.method} / mle step time on the same targets ({', '.join(targets)}): {other / base:.2f}x")


if __name__ == "__main__":
    main()
