"""``bayeslora`` command line: a thin layer over the Python API.

User errors (bad flags, missing files, corrupted runs) print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_bench import add_bench_parser
from .cli_posthoc import add_posthoc_parsers
from .io_utils import check_writable_folder, json_text

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with the benchmark data (default: $BAYESLORA_DATA)")
    p.add_argument("--source", choices=["local", "hub"], default="local",
                   help="read benchmark tasks from local release files or the Hugging Face hub")


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"Expected --option KEY=VALUE, but got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with a method", description="Fine-tune a base model with "
                       "LoRA and a (Bayesian) method on a multiple-choice task; writes a run directory.")
    p.add_argument("--model", default="smollm2-135m", help="base model: smollm2-135m (default), a .gguf file, "
                   "a Hugging Face directory or hub id, or tiny-random-llama (tests only)")
    p.add_argument("--dataset", default="arith", help="task name (see `bayeslora tasks`) or a .jsonl/.csv file")
    p.add_argument("--method", default="mle", help="method name (see `bayeslora methods`)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--format", default="auto", choices=["auto", "letter", "cloze"],
                   help="scoring format; auto = cloze for models under 1B parameters, letter otherwise")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],  # models.DTYPES
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU); eval and bayesianize reuse it")
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=0.0, help="epochs, used when --max-steps is 0")
    p.add_argument("--batch-size", type=int, default=8, help="questions per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW, warmup + linear decay)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps for linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per row (left-truncated)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, init and sampling")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA input dropout")
    p.add_argument("--target-modules", default="q_proj,v_proj,lm_head", help="comma-separated LoRA targets")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (method default if unset)")
    p.add_argument("--samples", type=int, default=None, help="test-time posterior samples (method default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (repeatable), e.g. --option prior_std=0.2")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training questions")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: off)")
    p.add_argument("--eval-limit", type=int, default=200, help="questions for evaluation during training")
    p.add_argument("--eval-dataset", default=None, metavar="TASK_OR_FILE",
                   help="questions for --eval-every: a task (its validation split) or a data file (default: the "
                        "training dataset's validation split; a training file is one split)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_flags(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .config import TrainConfig
    from .methods import AdapterConfig
    from .train import train

    options = dict(_parse_option(o) for o in args.option)
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    if args.samples is not None:
        options["n_samples"] = args.samples
    adapter = AdapterConfig(r=args.r, alpha=args.alpha, dropout=args.lora_dropout,
                            target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()])
    config = TrainConfig(model=args.model, dataset=args.dataset, method=args.method, method_options=options,
                         format=args.format, dtype=args.dtype, data_dir=args.data_dir, source=args.source,
                         adapter=adapter, lr=args.lr,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
                         epochs=args.epochs, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                         max_length=args.max_length,
                         train_limit=args.train_limit, eval_every=args.eval_every, eval_limit=args.eval_limit,
                         eval_dataset=args.eval_dataset,
                         save_every=args.save_every, seed=args.seed)
    run_dir = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, only the main process reports
        print(f"run written to {run_dir}")
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run", description="Evaluate a run on a dataset split: writes "
                       "metrics.json, predictions.jsonl (probabilities and uncertainty per example) and "
                       "reliability.png.")
    p.add_argument("run_dir", help="run directory written by `bayeslora train`")
    p.add_argument("--dataset", default=None, help="task name or file (default: the run's training task)")
    p.add_argument("--split", default=None, choices=["train", "validation", "test"],
                   help="split of a named task (default: validation); a data file is one split and has none")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval/DATASET-SPLIT)")
    p.add_argument("--samples", type=int, default=None, help="posterior samples (default: the method's)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward batch")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (a split's first "
                                                             "questions need not be typical of it: see --sample)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="evaluate a fixed random N questions, in their original order (the same N always gives "
                        "the same questions: the calibration grids' subsets)")
    p.add_argument("--seed", type=int, default=0, help="seed of posterior sampling")
    p.add_argument("--model", default=None, help="override the run's base model spec")
    p.add_argument("--ood", action="append", default=[], metavar="DATASET",
                   help="also evaluate this out-of-distribution set (a task's test split, or a file; repeatable) "
                        "and report the AUROC of telling its questions from the evaluated ones by epistemic "
                        "uncertainty and by predictive entropy")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a prediction-time method option (repeatable), e.g. --option predictive=antithetic "
                        "(blob) or --option link=probit (laplace)")
    _add_data_flags(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .bench.ood import ood_auroc
    from .evaluate import collapse_note, evaluate_examples, write_evaluation
    from .runs import load_run, read_run_info
    from .tasks import is_user_file, load_task, random_subset

    info = read_run_info(args.run_dir)
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        raise ValueError(f"{args.run_dir} does not record its training dataset: pass --dataset")
    if args.limit is not None and args.sample is not None:
        raise ValueError("Pass one of --limit (the first N questions) and --sample (a fixed random N), not both")
    for flag in ("limit", "sample"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"Expected --{flag} >= 1, but got {value}")
    split = _eval_split(dataset, args.split, info)
    name = Path(dataset).stem if is_user_file(dataset) else dataset
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval" / f"{name}-{split}"
    check_writable_folder(out)  # before the model loads

    def questions(task: str, task_split: str):
        examples = load_task(task, task_split, args.data_dir, args.source, limit=args.limit)
        chosen = random_subset(examples, args.sample)
        if args.sample is not None and args.sample > len(examples):
            print(f"note: --sample {args.sample} is more than the {len(examples)} questions of {task}: all are "
                  "evaluated", file=sys.stderr)
        subset = (f"random {len(chosen)} of {len(examples)} (fixed draw)" if args.sample is not None else
                  f"first {len(chosen)}" if args.limit is not None else "all")
        return chosen, subset

    examples, subset = questions(dataset, "validation" if split == "file" else split)
    ood_sets = {task: questions(task, "test") for task in args.ood}
    options = dict(_parse_option(o) for o in args.option)
    # checked before the model loads: a training-time key or a bad value fails at once
    run = load_run(args.run_dir, model_spec=args.model, options=options)

    def evaluate(chosen):
        return evaluate_examples(run, chosen, n_samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                                 progress=not args.no_progress)

    result, pred = evaluate(examples)
    result.update(dataset=dataset, split=split, questions=subset, method=run.method.name,
                  run_dir=str(Path(args.run_dir).resolve()),
                  settings={"samples": args.samples, "seed": args.seed, "batch_size": args.batch_size,
                            "options": options, "model": args.model or info.get("model")})
    if ood_sets:
        result["ood"] = {}
        for task, (chosen, task_subset) in ood_sets.items():
            ood_metrics, ood_pred = evaluate(chosen)
            result["ood"][task] = {**ood_auroc(pred, ood_pred), "questions": task_subset,
                                   **{k: ood_metrics[k] for k in ("n", "acc", "ece", "nll", "mean_epistemic",
                                                                  "mean_total")}}
    if (out / "metrics.json").is_file():
        print(f"note: replacing the evaluation in {out} (--out DIR keeps both)", file=sys.stderr)
    write_evaluation(out, examples, pred, result, title=f"{run.method.name} on {dataset} ({split})")
    print(json_text({k: result[k] for k in ("n", "acc", "ece", "nll", "brier", "auroc_misclassification",
                                             "mean_epistemic")}))
    for task, row in result.get("ood", {}).items():
        print(json_text({"ood": task, **{k: row[k] for k in ("n", "auroc_ood_epistemic", "auroc_ood_entropy",
                                                             "acc", "mean_epistemic")}}))
    print(f"wrote {out}/metrics.json, predictions.jsonl, reliability.png")
    note = collapse_note(result, run.method.point_mass_hint)
    if note:
        print(note, file=sys.stderr)
    return 0


def _eval_split(dataset: str, split: str | None, info: dict) -> str:
    """The split ``eval`` reports: a named task's (default validation), or ``file`` for a data file, which has no
    splits; a note where ``--split`` is ignored or the file is the run's own training data."""
    from .tasks import is_user_file

    if not is_user_file(dataset):
        return split or "validation"
    if split is not None:
        print(f"note: {dataset} is a data file, one split: --split {split} is ignored", file=sys.stderr)
    trained_on = info.get("dataset")
    if trained_on and Path(trained_on).resolve() == Path(dataset).resolve():
        print(f"note: {dataset} is the file this run was trained on: these are training-set metrics (pass "
              "--dataset with held-out questions)", file=sys.stderr)
    return "file"


def _methods_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the registered methods, or one method's --option keys")
    p.add_argument("name", nargs="?", default=None, help="a method: list its options, defaults and meaning")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args) -> int:
    import dataclasses

    from .methods import METHODS, get_method_class

    if args.name is None:
        width = max(len(n) for n in METHODS)
        for name in sorted(METHODS):
            print(f"{name:<{width}}  {METHODS[name].description}")
        return 0
    cls = get_method_class(args.name)
    config = cls.config_cls()
    print(f"{cls.name}: {cls.description}")
    print("options (--option KEY=VALUE; * = may change at eval/serve time):")
    fields = dataclasses.fields(config)
    width = max(len(f.name) for f in fields)
    for f in fields:
        mark = "*" if f.name in config.PREDICTION_OPTIONS else " "
        print(f"  {mark} {f.name:<{width}}  {getattr(config, f.name)!r:<10}  {f.metadata.get('help', '')}")
    return 0


def _tasks_parser(sub) -> None:
    p = sub.add_parser("tasks", help="list the built-in task names")
    p.set_defaults(func=_cmd_tasks)


def _cmd_tasks(args) -> int:
    from .tasks import TASKS

    width = max(len(n) for n in TASKS)
    for name in TASKS:
        print(f"{name:<{width}}  {TASKS[name].description}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the default model on the built-in task and report calibration",
                       description="Fine-tunes SmolLM2-135M with LoRA on the built-in arithmetic task (CPU, offline), "
                       "evaluates it in- and out-of-distribution before and after, prints a table and writes "
                       "reliability diagrams.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--steps", type=int, default=60, help="training steps per method")
    p.add_argument("--eval-limit", type=int, default=200, help="questions per evaluation set")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the demo's set)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--md", default=None, help="also write the results as a Markdown fragment here "
                   "(e.g. docs/results/demo.md)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import DEFAULT_DEMO_METHODS, run_demo

    methods = args.methods.split(",") if args.methods else list(DEFAULT_DEMO_METHODS)
    import shlex

    run_demo(Path(args.out), model=args.model, steps=args.steps, eval_limit=args.eval_limit, methods=methods,
             seed=args.seed, md=Path(args.md) if args.md else None,
             command="bayeslora " + shlex.join(sys.argv[1:]) if "demo" in sys.argv else "bayeslora demo")
    return 0


PARSERS = [_train_parser, _eval_parser, _methods_parser, _tasks_parser, _demo_parser]
PARSERS.append(add_bench_parser)
PARSERS.append(add_posthoc_parsers)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default where it has one and the text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bayeslora", description="Bayesian fine-tuning of LLMs with LoRA")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):  # transformers' own bars too (loading a model's weights)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        if os.environ.get("RANK", "0") == "0":  # under `accelerate launch` every process fails alike: say it once
            print(f"bayeslora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _serve_parser(sub) -> None:
    from .cli_serve import add_serve_parser

    add_serve_parser(sub)


PARSERS.append(_serve_parser)


if __name__ == "__main__":
    sys.exit(main())
