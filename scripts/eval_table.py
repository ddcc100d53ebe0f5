"""A RESULTS.md fragment from `bayeslora eval` output folders: one row per label, mean ± sample std over its folders
(one per seed), with the commands that made them.

    python scripts/eval_table.py --row MLE runs/tfb200/mle-s1-eval,runs/tfb200/mle-s2-eval \
        --row TFB runs/tfb200/s1-eval,runs/tfb200/s2-eval --title "..." --command "bayeslora eval ..." \
        --md docs/results/FRAGMENT.md

Each folder's metrics.json is read as `bayeslora eval` wrote it; folders of one row must have evaluated the same
number of questions of the same split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bayeslora.bench.report import format_cell
from bayeslora.bench.results_md import environment
from bayeslora.io_utils import atomic_write_text

COLUMNS = (("acc", "ACC %", 100.0, 1), ("ece", "ECE %", 1.0, 1), ("nll", "NLL", 1.0, 3), ("brier", "Brier", 1.0, 3),
           ("mean_epistemic", "epistemic", 1.0, 3))


def read_row(label: str, dirs: str) -> tuple[str, list[dict]]:
    metrics = []
    for d in dirs.split(","):
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run `bayeslora eval ... --out {d}` first")
        metrics.append(json.loads(path.read_text()))
    if len({(m["n"], m["split"], m["dataset"]) for m in metrics}) != 1:
        raise SystemExit(f"The folders of row {label!r} evaluated different questions: "
                         f"{sorted({(m['n'], m['split'], m['dataset']) for m in metrics})}")
    return label, metrics


def table(rows: list[tuple[str, list[dict]]]) -> list[str]:
    head = "| row | folders | " + " | ".join(c[1] for c in COLUMNS) + " | per folder: ACC / ECE / NLL |"
    lines = [head, "|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for label, ms in rows:
        cells = [format_cell([m[key] for m in ms], scale, digits) for key, _, scale, digits in COLUMNS]
        each = "; ".join(f"{100 * m['acc']:.1f} / {m['ece']:.1f} / {m['nll']:.3f}" for m in ms)
        lines.append(f"| {label} | {len(ms)} | " + " | ".join(cells) + f" | {each} |")
    return lines


def fragment(title: str, intro: str, body: list[str], commands: list[str]) -> list[str]:
    """A docs/results fragment: title, intro, body, the commands that made it, hardware and versions."""
    env = environment()
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    return lines + [*body, "", "Commands:", "", "```", *commands, "```", "",
                    f"Hardware: {env['cpu']}, {env['cores']} cores visible; GPU: {env['gpu']}.",
                    f"Versions: python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
                    f"peft {env['peft']}.", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", nargs=2, required=True, metavar=("LABEL", "DIRS"),
                   help="a row: its label and its eval output folders, comma-separated (repeatable)")
    p.add_argument("--title", required=True)
    p.add_argument("--intro", default="", help="a paragraph under the title")
    p.add_argument("--command", action="append", default=[], help="a command that made the folders (repeatable)")
    p.add_argument("--md", required=True, help="the Markdown fragment to write")
    args = p.parse_args(argv)
    rows = [read_row(label, dirs) for label, dirs in args.row]
    first = rows[0][1][0]
    body = [f"`{first['dataset']}` {first['split']}, {first['n']} questions per folder; mean ± sample std over the "
            "folders (seeds) of each row.", "", *table(rows)]
    this = "python scripts/eval_table.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                             else sys.argv[1:]))
    lines = fragment(args.title, args.intro, body, [*args.command, this])
    atomic_write_text(Path(args.md), "\n".join(lines))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
