"""``bayeslora bench speed``: the speed benchmark's command line.

:func:`add_speed_command` adds ``speed`` to the ``bench`` subparser group of :mod:`bayeslora.cli_bench`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"Expected comma-separated integers, but got {text!r}") from None


def add_speed_command(bench) -> None:
    p = bench.add_parser("speed", help="training-step time/memory per method and predictive cost vs deterministic",
                         description="Measure, on one model and batch: each method's training step time and peak "
                         "memory relative to MLE (one subprocess per method), and a BLoB model's predictive time: "
                         "deterministic forward, S samples sequential vs batched, and the cheap head predictive. "
                         "Prints a markdown table with hardware and versions.")
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--dataset", default="arc-e", help="task whose first questions form the batch")
    p.add_argument("--methods", default="mle,map,mcd,ens,blob", help="comma-separated methods")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per method (after 1 warm-up)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--rounds", type=int, default=1, help="training part: subprocesses per method, the methods "
                   "taking turns; the ratio to MLE is the median of the rounds' ratios (steps vary by process)")
    p.add_argument("--repeats", type=int, default=2, help="timed predictive runs per setting (after 1 warm-up)")
    p.add_argument("--samples", default="1,4,10", help="comma-separated sample counts S")
    p.add_argument("--parts", default="train,predictive,scoring",
                   help="comma-separated parts: train (step time/memory per method), predictive (BLoB sample "
                   "costs), scoring (cloze shared context vs one pass), posthoc (post-hoc fit time vs one MLE "
                   "epoch; not in the default: minutes on a CPU)")
    p.add_argument("--posthoc-methods", default="laplace,tfb,temperature",
                   help="comma-separated post-hoc methods of the posthoc part, each NAME or "
                        "NAME:KEY=VALUE[:KEY=VALUE] (e.g. laplace:prior=marglik)")
    p.add_argument("--fit-questions", type=int, default=64,
                   help="posthoc part: training questions of the MLE epoch and of the fits")
    p.add_argument("--format", default="auto", choices=["auto", "letter", "cloze"],
                   help="how questions are scored (auto: cloze for models under 1B parameters)")
    p.add_argument("--keep-mle", default=None, metavar="DIR",
                   help="posthoc part: keep the run of its MLE epoch in DIR (a new folder), e.g. to fit or serve it")
    p.add_argument("--md", default=None, help="write the markdown report here (e.g. docs/results/speed.md)")
    p.add_argument("--json", default=None, help="write the raw measurements here; each finished part is saved at "
                   "once and a rerun with the same options reuses it")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $BAYESLORA_DATA)")
    p.set_defaults(func=_cmd_speed)


def _cmd_speed(args) -> int:
    from .bench.speed import SpeedConfig, posthoc_entry, run_speed, write_speed
    from .methods import build_method, get_method_class

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    posthoc = [m.strip() for m in args.posthoc_methods.split(",") if m.strip()]
    for name in methods:
        get_method_class(name)  # unknown names fail before any measurement
    for entry in posthoc:
        name, options = posthoc_entry(entry)
        build_method(name, options)  # unknown names and options too
        if not getattr(get_method_class(name), "posthoc", False):
            raise ValueError(f"Method {name!r} is trained end to end, not post hoc: it cannot be in --posthoc-methods")
    if args.keep_mle is not None and Path(args.keep_mle).exists():
        raise ValueError(f"--keep-mle {args.keep_mle!r} already exists: give a new folder")
    config = SpeedConfig(model=args.model, dataset=args.dataset, methods=methods, batch_size=args.batch_size,
                         steps=args.steps, rounds=args.rounds, repeats=args.repeats, samples=_ints(args.samples),
                         data_dir=args.data_dir,
                         parts=[x.strip() for x in args.parts.split(",") if x.strip()], posthoc_methods=posthoc,
                         fit_questions=args.fit_questions, format=args.format, keep_mle=args.keep_mle,
                         dtype=args.dtype)
    result = run_speed(config, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                       partial=Path(args.json) if args.json else None)
    command = "bayeslora " + shlex.join(sys.argv[1:]) if "speed" in sys.argv else "bayeslora bench speed"
    print(write_speed(result, Path(args.md) if args.md else None, Path(args.json) if args.json else None, command))
    return 0
