"""The grid's report: Markdown tables (mean ± std over seeds), reliability and risk-coverage PNGs, one HTML page.

Everything here is a function of ``results.jsonl`` and the saved per-example predictions, so a report can be
regenerated without rerunning a cell (``bayeslora bench report OUT``).
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from ..io_utils import atomic_write_text
from .grid import CELLS_DIR, Cell, _safe, load_predictions, read_results
from .selective import risk_coverage

FIGURES_DIR = "figures"
TABLE_FILE = "table.md"
HTML_FILE = "report.html"

#: (key in a row's metrics, column title, scale, decimals); ECE is already in percent.
METRICS = (("acc", "ACC (%)", 100.0, 2), ("ece", "ECE (%)", 1.0, 2), ("nll", "NLL", 1.0, 3),
           ("brier", "Brier", 1.0, 3), ("aurc", "AURC", 1.0, 3), ("acc_at_80cov", "ACC @80% cov. (%)", 100.0, 2))
OOD_METRICS = (("acc", "ACC (%)", 100.0, 2), ("ece", "ECE (%)", 1.0, 2), ("nll", "NLL", 1.0, 3),
               ("auroc_ood_epistemic", "AUROC epistemic", 1.0, 3), ("auroc_ood_entropy", "AUROC entropy", 1.0, 3))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``None`` with one value). NaN/None values are dropped."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], scale: float = 1.0, decimals: int = 2) -> str:
    mean, std = mean_std([None if v is None else v * scale for v in values])
    if math.isnan(mean):
        return "–"
    return f"{mean:.{decimals}f}" if std is None else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _order(items) -> list:
    return list(dict.fromkeys(items))


def split_table(rows: list[dict], split: str, metrics=METRICS) -> dict | None:
    """Rows ``dataset / method`` (grouped by dataset), columns the metrics, cells mean ± std over seeds.

    ``split`` is an evaluation-set name of the rows' metrics: "validation", "test" or "ood" (every ``ood:NAME`` set,
    one row per set and method). ``None`` when no row has it.
    """
    rows = _ok(rows)
    names = ([n for n in _order(k for r in rows for k in r.get("metrics", {})) if n.startswith("ood:")]
             if split == "ood" else [split])
    values: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seeds: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        for name in names:
            if name in r.get("metrics", {}):
                key = (r["dataset"] if split != "ood" else name.removeprefix("ood:"), r["method"])
                values[key].append(r["metrics"][name])
                seeds[key].append(r["seed"])
    if not values:
        return None
    datasets = _order(d for d, _ in values)
    methods = _order(r["method"] for r in rows)
    body = {f"{d} / {m}": [*(format_cell([v.get(key) for v in values[(d, m)]], scale, decimals)
                             for key, _, scale, decimals in metrics), seed_list(seeds[(d, m)])]
            for d in datasets for m in methods if (d, m) in values}
    return {"columns": [*(title for _, title, _, _ in metrics), "seeds"], "rows": body}


def seed_list(seeds: list[int]) -> str:
    """The seeds a row averages, e.g. ``1, 2, 3``."""
    return ", ".join(str(s) for s in sorted(seeds))


SECTIONS = (("validation", "In-distribution, validation split", METRICS),
            ("test", "In-distribution, test split", METRICS),
            ("ood", "Out-of-distribution (cells trained on the OOD training task, e.g. OBQA; AUROC of OOD vs "
                    "in-distribution test questions by epistemic uncertainty and by predictive entropy)", OOD_METRICS))


def sections(rows: list[dict]) -> list[tuple[str, dict, str]]:
    """``(title, table, corner label)`` of every non-empty table, the cost table last."""
    out = []
    for split, title, metrics in SECTIONS:
        table = split_table(rows, split, metrics)
        if table is not None:
            out.append((title, table, "OOD set / method" if split == "ood" else "dataset / method"))
    if _ok(rows):
        out.append(("Cost per cell (mean over the method's cells)", cost_table(rows), "method"))
    return out


def _fit_s(row: dict) -> float | None:
    """A post-hoc cell's fit time: the fit's own (``fit_only_s``, no model loading, like the MLE epoch's training
    loop), or for cells written before it was recorded (2026-11-25) the whole ``bayesianize`` call."""
    return row.get("fit_only_s") or row.get("fit_time_s")


def cost_table(rows: list[dict]) -> dict:
    """Mean wall times and peak memory per method over its cells."""
    rows = _ok(rows)
    columns = ["train s", "post-hoc fit s", "fit / MLE epoch", "eval s (validation)", "eval / MLE eval",
               "cell wall s", "peak RSS MB"]
    body = {}

    def eval_s(r):
        return r["metrics"].get("validation", {}).get("eval_time_s")

    mle_eval = {}  # (dataset, seed) -> the MLE cell's evaluation time: the deterministic forward on the same questions
    for r in rows:
        if r["method"] == "mle" and eval_s(r):
            mle_eval[r["dataset"], r["seed"]] = eval_s(r)
    for m in _order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        eval_ratio = [eval_s(r) / mle_eval[r["dataset"], r["seed"]]
                      if eval_s(r) and (r["dataset"], r["seed"]) in mle_eval else None for r in mine]
        body[m] = [format_cell([r.get("train_time_s") for r in mine], decimals=1),
                   format_cell([_fit_s(r) for r in mine], decimals=1),
                   format_cell([_fit_s(r) / r["fit_epoch_s"] if _fit_s(r) and r.get("fit_epoch_s") else None
                                for r in mine], decimals=2),
                   format_cell([eval_s(r) for r in mine], decimals=1),
                   format_cell(eval_ratio, decimals=2),
                   format_cell([r.get("wall_time_s") for r in mine], decimals=1),
                   format_cell([r.get("peak_rss_mb") for r in mine], decimals=0)]
    return {"columns": columns, "rows": body}


def markdown_table(table: dict, corner: str = "method") -> str:
    head = f"| {corner} | " + " | ".join(table["columns"]) + " |"
    sep = "|---|" + "---:|" * len(table["columns"])
    lines = [head, sep] + [f"| {m} | " + " | ".join(cells) + " |" for m, cells in table["rows"].items()]
    return "\n".join(lines)


def failures(rows: list[dict]) -> list[str]:
    return [f"{r['method']} / {r['dataset']} / seed {r['seed']}: {r.get('error')}" for r in rows
            if r.get("status") != "ok"]


INTRO = ("Mean ± sample std over seeds (no ± with one seed). ECE with 15 equal-width bins, in percent. AURC: area "
         "under the risk-coverage curve (lower is better); ACC @80% cov.: accuracy on the 80% most confident "
         "questions. Post-hoc methods fit on their own default split (temperature scaling: validation), so for them "
         "the test split is the clean comparison.")


def tables_markdown(rows: list[dict]) -> str:
    """The Markdown report body: in-distribution (validation, test), OOD, cost, failed cells."""
    parts = [INTRO]
    parts += [f"### {title}\n\n{markdown_table(table, corner)}" for title, table, corner in sections(rows)]
    walls = [r["wall_time_s"] for r in rows if r.get("wall_time_s") is not None]
    if walls:
        parts.append(f"Sum of the cells' wall times: {sum(walls) / 60:.1f} min over {len(walls)} cells (each cell "
                     "loads the model, trains or fits, and evaluates; the cells run one after the other).")
    failed = failures(rows)
    if failed:
        parts.append("### Failed cells\n\n" + "\n".join(f"- {f}" for f in failed))
    return "\n\n".join(parts) + "\n"


# -- figures ------------------------------------------------------------------------------------------------------
def _pooled(out: Path, rows: list[dict], method: str, dataset: str,
            split: str) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """Concatenated predictions of a method x dataset over its seeds, and those seeds (``None`` when none were
    saved)."""
    probs, labels, seeds = [], [], []
    for r in _ok(rows):
        if r["method"] == method and r["dataset"] == dataset:
            path = Path(out) / CELLS_DIR / Cell(method, dataset, r["seed"]).key / f"{split}.safetensors"
            if path.is_file():
                saved = load_predictions(path)
                probs.append(saved["probs"])
                labels.append(saved["labels"])
                seeds.append(r["seed"])
    if not probs:
        return None
    width = max(p.shape[1] for p in probs)
    probs = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in probs]
    return torch.cat(probs), torch.cat(labels), seeds


def _seeds_label(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seed_list(seeds)} pooled"


def risk_coverage_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str = "") -> Path:
    """One risk-coverage curve per method: ``curves[name] = (confidence (N,), correct (N,))``."""
    from ..plots import figure, save_figure
    from .selective import aurc

    fig, ax = figure(figsize=(4.8, 3.6))
    for name, (conf, correct) in curves.items():
        cov, risk = risk_coverage(conf, correct)
        ax.plot(cov.numpy(), risk.numpy(), label=f"{name} (AURC {aurc(conf, correct):.3f})", linewidth=1.4)
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.axvline(0.8, color="gray", linestyle=":", linewidth=1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def make_figures(out: Path, rows: list[dict], split: str = "validation") -> list[Path]:
    """Reliability diagram per method x dataset and risk-coverage plot per dataset: each seed's questions are
    pooled into one curve (the seeds are named in the titles and legends; the tables give the spread over seeds)."""
    from ..plots import reliability_diagram

    out = Path(out)
    fig_dir = out / FIGURES_DIR
    paths = []
    methods = _order(r["method"] for r in _ok(rows))
    for dataset in _order(r["dataset"] for r in _ok(rows)):
        curves, all_seeds = {}, set()
        for method in methods:
            pooled = _pooled(out, rows, method, dataset, split)
            if pooled is None:
                continue
            probs, labels, seeds = pooled
            paths.append(reliability_diagram(probs, labels, fig_dir / f"reliability_{method}-{_safe(dataset)}.png",
                                             title=f"{method} on {dataset} ({split}, {_seeds_label(seeds)})"))
            conf, pred = probs.max(-1)
            curves[method] = (conf, pred == labels, seeds)
            all_seeds.update(seeds)
        # a method with fewer seeds than the others names its own in the legend
        curves = {name if sorted(seeds) == sorted(all_seeds) else f"{name}, {_seeds_label(seeds)}": (conf, ok)
                  for name, (conf, ok, seeds) in curves.items()}
        if curves:
            paths.append(risk_coverage_plot(curves, fig_dir / f"risk_coverage_{_safe(dataset)}.png",
                                            title=f"Selective prediction on {dataset} ({split}, "
                                                  f"{_seeds_label(sorted(all_seeds))})"))
    return paths


# -- HTML ---------------------------------------------------------------------------------------------------------
def _html_table(table: dict, corner: str = "method") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [corner, *table["columns"]])
    body = "".join("<tr><th>" + html.escape(m) + "</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                   + "</tr>" for m, cells in table["rows"].items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #bbb;padding:3px 8px}"
        "td{text-align:right}thead th{background:#eee}img{max-width:32%;margin:4px;border:1px solid #ddd}"
        "pre{background:#f5f5f5;padding:8px;white-space:pre-wrap}")


# Marks the page with how many images the browser decoded (checked by the headless-browser test).
_LOAD_CHECK = ("window.addEventListener('load',function(){var n=0;for(const i of document.images)"
               "{if(i.complete&&i.naturalWidth>0)n++;}document.body.dataset.imagesDecoded=n;});")


def html_report(rows: list[dict], figures: list[Path], title: str, command: str = "") -> str:
    """One self-contained page: the tables and every figure inlined as a base64 PNG."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if command:
        parts.append(f"<p>Command:</p><pre>{html.escape(command)}</pre>")
    parts.append(f"<p>{html.escape(INTRO)}</p>")
    parts += [f"<h3>{html.escape(heading)}</h3>{_html_table(table, corner)}"
              for heading, table, corner in sections(rows)]
    failed = failures(rows)
    if failed:
        parts.append("<h3>Failed cells</h3><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failed) + "</ul>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for path in figures:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            alt = html.escape(Path(path).stem)
            parts.append(f'<img alt="{alt}" title="{alt}" src="data:image/png;base64,{data}">')
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_LOAD_CHECK}</script></body></html>\n")


def write_report(out: Path, title: str = "bayeslora calibration benchmark", command: str = "") -> dict[str, Path]:
    """``table.md``, ``figures/*.png`` and ``report.html`` in ``out`` from its ``results.jsonl``."""
    out = Path(out)
    rows = read_results(out)
    atomic_write_text(out / TABLE_FILE, tables_markdown(rows))
    figures = make_figures(out, rows)
    atomic_write_text(out / HTML_FILE, html_report(rows, figures, title, command))
    return {"table": out / TABLE_FILE, "html": out / HTML_FILE, "figures": out / FIGURES_DIR}
