"""``bayeslora bench ...``: the benchmark subcommands (``calibration``, ``report``, ``results``).

``BENCH_COMMANDS`` lists the functions that add one ``bench`` subcommand each; other benchmarks (``bench speed``)
join by appending theirs, so that ``bench`` stays one argparse group.
"""

from __future__ import annotations

import shlex

from .cli_bench_speed import add_speed_command
import sys
from pathlib import Path


def _csv(text: str, flag: str = "list") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"Expected a comma-separated {flag}, but got {text!r}")
    return items


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise ValueError(f"Expected --seeds as comma-separated integers (e.g. 1,2,3), but got {text!r}") from None


def _calibration_parser(bench) -> None:
    from .bench.grid import PRESETS

    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    p = bench.add_parser("calibration", help="methods x datasets x seeds calibration grid with a report",
                         description="Train (or Bayesianize post hoc) and evaluate every method x dataset x seed "
                         "cell; resumable (finished cells are skipped), a failed cell is recorded and the grid goes "
                         f"on (exit status 1 when a cell failed). Writes OUT/results.jsonl, table.md, figures/*.png and "
                         f"report.html. Presets: {presets}")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS), help="budget preset")
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets (default: the preset's)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--ood", action="append", default=[], metavar="FILE",
                   help="extra OOD .jsonl/.csv file evaluated against the OBQA cells (repeatable)")
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $BAYESLORA_DATA)")
    p.add_argument("--in-process", action="store_true",
                   help="run the cells in this process (default: one child process per cell, for per-cell peak "
                   "memory and isolation from hard crashes)")
    p.set_defaults(func=_cmd_calibration)


def _cmd_calibration(args) -> int:
    from .bench.grid import make_config, run_grid
    from .bench.report import write_report

    command = "bayeslora " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else ""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; expected the grid's folder")
    config = make_config(args.out, args.preset, methods=_csv(args.methods, "--methods") if args.methods is not None
                         else None, datasets=_csv(args.datasets, "--datasets") if args.datasets is not None else None,
                         seeds=_seeds(args.seeds) if args.seeds else None, ood_files=args.ood, model=args.model,
                         data_dir=args.data_dir, command=command)
    rows = run_grid(config, log=lambda msg: print(msg, flush=True), subprocesses=not args.in_process)
    paths = write_report(Path(args.out), command=command)
    failed = [r for r in rows if r.get("status") != "ok"]
    print(f"{len(rows) - len(failed)} cell(s) ok, {len(failed)} failed; wrote {paths['table']}, {paths['html']}")
    return 1 if failed else 0


def _report_parser(bench) -> None:
    p = bench.add_parser("report", help="regenerate a grid's table, figures and HTML report",
                         description="Rebuild OUT/table.md, figures/*.png and report.html from OUT/results.jsonl.")
    p.add_argument("out", help="grid output folder")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .bench.grid import grid_command
    from .bench.report import write_report

    paths = write_report(Path(args.out), command=grid_command(Path(args.out)))
    print(f"wrote {paths['table']}, {paths['html']}")
    return 0


def _results_parser(bench) -> None:
    p = bench.add_parser("results", help="regenerate docs/RESULTS.md",
                         description="Write docs/results/calibration-PRESET.md (with -MODEL/-DATASETS added when the "
                         "grid's differ from its preset's) from each grid given with --grid "
                         "and assemble docs/RESULTS.md from every docs/results/*.md fragment plus the published "
                         "reference numbers.")
    p.add_argument("--grid", action="append", default=[],
                   help="grid output folder to (re)write docs/results/calibration-PRESET.md from (repeatable)")
    p.add_argument("--docs", default="docs", help="the docs folder (default: ./docs)")
    p.set_defaults(func=_cmd_results)


def _cmd_results(args) -> int:
    from .bench.results_md import write_calibration_fragment, write_results_md

    docs = Path(args.docs)
    for grid in args.grid:
        print(f"wrote {write_calibration_fragment(Path(grid), docs)}")
    print(f"wrote {write_results_md(docs)}")
    return 0


BENCH_COMMANDS = [_calibration_parser, _report_parser, _results_parser, add_speed_command]


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: calibration grid, reports, docs/RESULTS.md",
                       description="Reproducible benchmarks of the methods.")
    bench = p.add_subparsers(dest="bench_command", required=True)
    for add in BENCH_COMMANDS:
        add(bench)
