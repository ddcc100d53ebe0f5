"""``bayeslora bayesianize`` and ``bayeslora calibrate``: post-hoc methods on a trained adapter (same code)."""

from __future__ import annotations

import argparse
import json


def _common(p: argparse.ArgumentParser, split_default: str | None, split_help: str, option_example: str) -> None:
    from .cli import _add_data_flags

    p.add_argument("--dataset", default=None, help="task name or file to fit on (default: the source run's task)")
    p.add_argument("--split", default=split_default, choices=["train", "validation", "test"],
                   help=split_help)
    p.add_argument("--out", required=True, help="run directory to create (written only if the fit succeeds)")
    p.add_argument("--model", default=None, help="base model spec (required for a plain PEFT adapter without "
                   "base_model_name_or_path; overrides a run's model)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a method option (repeatable), e.g. --option {option_example}")
    p.add_argument("--samples", type=int, default=None, help="test-time posterior samples (method default)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions of the fit split (a "
                   "method that also tunes on the validation split draws those at random from all of it)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward batch during the fit")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling and posterior sampling in the fit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_flags(p)
    p.set_defaults(func=_cmd_bayesianize)


def _cmd_bayesianize(args) -> int:
    from .cli import _parse_option
    from .posthoc import bayesianize

    if args.source != "local":
        raise ValueError("Post-hoc fitting reads local task files only: drop --source hub")
    options = dict(_parse_option(o) for o in args.option)
    if args.samples is not None:
        options["n_samples"] = args.samples
    out = bayesianize(args.source_dir, args.method, args.out, dataset=args.dataset, split=args.split,
                      options=options, data_dir=args.data_dir, model=args.model, limit=args.limit, seed=args.seed,
                      batch_size=args.batch_size, progress=not args.no_progress)
    info = json.loads((out / "run.json").read_text())
    print(json.dumps({"method": info["method"], **info["fit"]}))
    print(f"run written to {out}")
    return 0


def add_posthoc_parsers(sub) -> None:
    p = sub.add_parser("bayesianize", help="make a trained LoRA adapter Bayesian post hoc (laplace, tfb, ...)",
                       description="Fit a post-hoc method (see `bayeslora methods`) to a LoRA adapter: a bayeslora "
                       "run directory (mle/map) or a plain PEFT adapter directory. Writes a run directory that "
                       "`bayeslora eval` reads.")
    p.add_argument("source_dir", metavar="RUN_OR_ADAPTER_DIR", help="bayeslora run or PEFT adapter directory")
    p.add_argument("--method", required=True, help="post-hoc method: laplace, tfb or temperature")
    _common(p, None, "split to fit on (default: the method's: train for laplace and tfb, validation for temperature)",
            "prior=marglik")
    p = sub.add_parser("calibrate", help="temperature-scale a trained run",
                       description="Fit one temperature by NLL on the validation split (same code as "
                       "`bayesianize --method temperature`).")
    p.add_argument("source_dir", metavar="RUN_DIR", help="bayeslora run or PEFT adapter directory")
    p.add_argument("--method", default="temperature", choices=["temperature"], help="calibration method")
    _common(p, "validation", "split to fit the temperature on (default: validation)", "max_iter=100")
