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


def metric_tables(rows: list[dict], split: str, metrics=METRICS) -> dict[str, dict]:
    """``{title: {"columns": [dataset...], "rows": {method: [cell text...]}}}`` for one evaluation set name."""
    rows = _ok(rows)
    methods = _order(r["method"] for r in rows)
    datasets = _order(r["dataset"] for r in rows if split in r.get("metrics", {}))
    tables = {}
    for key, title, scale, decimals in metrics:
        values: dict[tuple[str, str], list] = defaultdict(list)
        for r in rows:
            if split in r.get("metrics", {}):
                values[(r["method"], r["dataset"])].append(r["metrics"][split].get(key))
        body = {m: [format_cell(values[(m, d)], scale, decimals) if values[(m, d)] else "–" for d in datasets]
                for m in methods if any(values[(m, d)] for d in datasets)}
        if body:
            tables[title] = {"columns": datasets, "rows": body}
    return tables


def ood_tables(rows: list[dict]) -> dict[str, dict]:
    """Columns = OOD sets (``ood:NAME``) of the cells trained on the OOD training task."""
    rows = _ok(rows)
    names = _order(k for r in rows for k in r.get("metrics", {}) if k.startswith("ood:"))
    methods = _order(r["method"] for r in rows)
    tables = {}
    for key, title, scale, decimals in OOD_METRICS:
        body = {}
        for m in methods:
            cols = [[r["metrics"][n].get(key) for r in rows if r["method"] == m and n in r["metrics"]] for n in names]
            if any(cols):
                body[m] = [format_cell(c, scale, decimals) if c else "–" for c in cols]
        if body:
            tables[title] = {"columns": [n.removeprefix("ood:") for n in names], "rows": body}
    return tables


def cost_table(rows: list[dict]) -> dict:
    """Mean wall times and peak memory per method over its cells."""
    rows = _ok(rows)
    columns = ["train s", "post-hoc fit s", "eval s (validation)", "cell wall s", "peak RSS MB"]
    body = {}
    for m in _order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        body[m] = [format_cell([r.get("train_time_s") for r in mine], decimals=1),
                   format_cell([r.get("fit_time_s") for r in mine], decimals=1),
                   format_cell([r["metrics"].get("validation", {}).get("eval_time_s") for r in mine], decimals=1),
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


def tables_markdown(rows: list[dict]) -> str:
    """The whole Markdown report body: in-distribution (validation, test), OOD, cost, failed cells."""
    n_seeds = len(_order(r["seed"] for r in _ok(rows)))
    parts = [f"Mean ± sample std over seeds ({n_seeds} seed(s) in this grid; no ± with one seed). "
             "ECE with 15 equal-width bins, in percent. AURC: area under the risk-coverage curve (lower is better). "
             "Post-hoc methods fit on their own default split (temperature scaling: validation), so for them the "
             "test split is the clean comparison."]
    for split in ("validation", "test"):
        tables = metric_tables(rows, split)
        if tables:
            parts.append(f"### In-distribution, {split} split")
            parts += [f"**{title}**\n\n{markdown_table(t)}" for title, t in tables.items()]
    ood = ood_tables(rows)
    if ood:
        parts.append("### Out-of-distribution (trained on the OOD training task; AUROC: OOD vs in-distribution "
                     "test questions)")
        parts += [f"**{title}**\n\n{markdown_table(t)}" for title, t in ood.items()]
    if _ok(rows):
        parts.append("### Cost per cell\n\n" + markdown_table(cost_table(rows)))
    failed = failures(rows)
    if failed:
        parts.append("### Failed cells\n\n" + "\n".join(f"- {f}" for f in failed))
    return "\n\n".join(parts) + "\n"


# -- figures ------------------------------------------------------------------------------------------------------
def _pooled(out: Path, rows: list[dict], method: str, dataset: str, split: str) -> tuple[torch.Tensor, ...] | None:
    """Concatenated predictions of a method x dataset over its seeds (``None`` when none were saved)."""
    probs, labels = [], []
    for r in _ok(rows):
        if r["method"] == method and r["dataset"] == dataset:
            path = Path(out) / CELLS_DIR / Cell(method, dataset, r["seed"]).key / f"{split}.safetensors"
            if path.is_file():
                saved = load_predictions(path)
                probs.append(saved["probs"])
                labels.append(saved["labels"])
    if not probs:
        return None
    width = max(p.shape[1] for p in probs)
    probs = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in probs]
    return torch.cat(probs), torch.cat(labels)


def risk_coverage_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str = "") -> Path:
    """One risk-coverage curve per method: ``curves[name] = (confidence (N,), correct (N,))``."""
    from ..plots import _pyplot, _save
    from .selective import aurc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
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
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def make_figures(out: Path, rows: list[dict], split: str = "validation") -> list[Path]:
    """Reliability diagram per method x dataset and risk-coverage plot per dataset (pooled over seeds)."""
    from ..plots import reliability_diagram

    out = Path(out)
    fig_dir = out / FIGURES_DIR
    paths = []
    methods = _order(r["method"] for r in _ok(rows))
    for dataset in _order(r["dataset"] for r in _ok(rows)):
        curves = {}
        for method in methods:
            pooled = _pooled(out, rows, method, dataset, split)
            if pooled is None:
                continue
            probs, labels = pooled
            paths.append(reliability_diagram(probs, labels, fig_dir / f"reliability_{method}-{_safe(dataset)}.png",
                                             title=f"{method} on {dataset} ({split})"))
            conf, pred = probs.max(-1)
            curves[method] = (conf, pred == labels)
        if curves:
            paths.append(risk_coverage_plot(curves, fig_dir / f"risk_coverage_{_safe(dataset)}.png",
                                            title=f"Selective prediction on {dataset} ({split})"))
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
    parts.append("<p>Mean ± sample std over seeds. ECE in percent (15 bins). AURC: area under the risk-coverage "
                 "curve (lower is better).</p>")
    for split in ("validation", "test"):
        for name, t in metric_tables(rows, split).items():
            parts.append(f"<h3>{html.escape(name)}: in-distribution, {split}</h3>{_html_table(t)}")
    for name, t in ood_tables(rows).items():
        parts.append(f"<h3>{html.escape(name)}: out-of-distribution</h3>{_html_table(t)}")
    if _ok(rows):
        parts.append(f"<h3>Cost per cell</h3>{_html_table(cost_table(rows))}")
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
