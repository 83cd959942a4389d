"""The self-contained HTML report and the Markdown table of a results directory.

``write_report(out)`` reads ``out/results.json`` (or ``results.csv``) and
``out/runs/<run>.json`` and writes ``out/report.html`` (every image embedded
as base64, no external resource, a few lines of inline JavaScript to sort
the tables) and ``out/results.md`` (the summary table: mean ± std over
seeds, deltas against the clean baseline).
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from pathlib import Path
from typing import Any

from poisonlab.errors import DataError
from poisonlab.report.page import html_page
from poisonlab.report.tables import (GRID_COLUMNS, GROUP, as_number, format_value, load_rows, markdown_table,
                                     summarize, summary_columns)
from poisonlab.utils import atomic_write_text

PLOT_TITLES = {"history": "training curves", "confusion": "confusion matrix (clean test)",
               "confusion_triggered": "confusion matrix (triggered test)",
               "examples": "clean vs poisoned examples, |difference| amplified",
               "features": "penultimate features, 2-D PCA of a sample of up to 1,000 training images with (up to 300 "
                           "of) the poisons always in, so poisons look more common than they are (red: poisoned)",
               "scores": "detection scores",
               "per_class": "per-class accuracy on the clean test set, beside the clean baseline (and, for a "
                            "defence, the undefended poisoned model); the attack's target class in red",
               "nc_triggers": "Neural Cleanse: the reversed trigger of every class, mask (grey) above mask x "
                              "pattern, titled with the mask's L1 norm and anomaly index (red: flagged as a "
                              "backdoor target)",
               "strip_entropy": "STRIP: entropy of the predictions on blended copies, clean vs triggered test "
                                "inputs; inputs left of the dashed threshold are rejected"}

_CSS = """
table{font-size:13px;margin:.5em 0 1.5em}
th,td{white-space:nowrap}
th{background:#eef;cursor:pointer;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.t,th.t{text-align:left}tr.err td{background:#fee}
details{margin:.4em 0;border:1px solid #ddd;border-radius:4px;padding:.3em .6em}
summary{cursor:pointer;font-weight:600}
figure{display:inline-table;margin:.5em;vertical-align:top}
figcaption{display:table-caption;caption-side:bottom;font-size:12px;color:#555;padding-top:2px}
img{max-width:100%;border:1px solid #eee}.wrap{overflow-x:auto}.note{color:#666;font-size:13px}
"""

# Click a header to sort by that column (numbers numerically via data-v, text otherwise); click again to reverse.
_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener('click', function () {
      var asc = !th.classList.contains('asc');
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(asc ? 'asc' : 'desc');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y), r;
        if (!isNaN(nx) && !isNaN(ny)) { r = nx - ny; }
        else if (isNaN(nx) !== isNaN(ny)) { r = isNaN(nx) ? 1 : -1; }
        else { r = String(x).localeCompare(String(y)); }
        return asc ? r : -r;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  table.setAttribute('data-sortable', 'ready');
});
"""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_confined_png(root: Path, rel: Any, max_bytes: int = 64 << 20) -> bytes:
    """The bytes of the PNG file ``rel`` (a path relative to ``root``) that lies inside ``root``.

    ``rel`` comes from a run file anyone could have edited, so it is checked, not trusted: it must be a
    relative path that, with every symlink resolved, stays inside ``root``, names a regular file of at most
    ``max_bytes`` bytes, and starts with the PNG signature. Raises :class:`DataError` saying which check failed.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"expected a relative file path, got {type(rel).__name__}")
    if Path(rel).is_absolute():
        raise DataError(f"{rel!r} is an absolute path; only files inside the results folder are read")
    base = root.resolve()
    try:
        path = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise DataError(f"{rel!r} does not exist") from None
    if not path.is_relative_to(base):
        raise DataError(f"{rel!r} leads outside the results folder (to {path})")
    if not path.is_file():
        raise DataError(f"{rel!r} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{rel!r} is larger than {max_bytes} bytes")
    if not data.startswith(PNG_SIGNATURE):
        raise DataError(f"{rel!r} is not a PNG file")
    return data


def _plot_figures(out: Path, run: str, detail: Any) -> list[str]:
    """``<figure>`` elements for the plots ``out/runs/<run>.json`` names; one failing a check is skipped with a warning."""
    source = out / "runs" / f"{run}.json"
    plots = detail.get("plots") if isinstance(detail, dict) else None
    if plots is not None and not isinstance(plots, dict):
        warnings.warn(f"{source}: run {run}: field 'plots' must map plot kinds to files, found "
                      f"{type(plots).__name__}; its plots are skipped", stacklevel=3)
        plots = None
    figs = []
    for kind, rel in (plots or {}).items():
        try:
            png = read_confined_png(out, rel)
        except (DataError, OSError) as e:
            warnings.warn(f"{source}: run {run}: plots.{kind} skipped: {e}", stacklevel=3)
            continue
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        figs.append(f'<figure><img alt="{html.escape(run)} {html.escape(str(kind))}" src="{src}">'
                    f"<figcaption>{html.escape(PLOT_TITLES.get(kind, str(kind)))}</figcaption></figure>")
    return figs


def _cell(col: str, value: Any, std: Any = None) -> str:
    text = str(value) if col in GROUP or col in ("run",) else format_value(col, value, std)
    sort = as_number(value)
    v = html.escape(str(sort if sort is not None else (value if value is not None else "")))
    cls = ' class="t"' if col in GROUP or col == "run" else ""
    return f'<td{cls} data-v="{v}">{html.escape(text)}</td>'


def _table(rows: list[dict[str, Any]], cols: list[str], table_id: str, std: bool) -> str:
    head = "".join(f'<th class="t">{html.escape(c)}</th>' if c in GROUP or c == "run" else f"<th>{html.escape(c)}</th>"
                   for c in cols)
    body = []
    for r in rows:
        cls = ' class="err"' if r.get("error") or r.get("failed") else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c, r.get(c), r.get(c + "_std") if std else None) for c in cols)
                    + "</tr>")
    return (f'<div class="wrap"><table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _overview(summary: list[dict[str, Any]]) -> list[str]:
    """The overview figure (clean accuracy vs ASR, DER per defence, ASR against the grid's axes), if any."""
    from poisonlab.report.page import png_data_uri
    from poisonlab.report.plots import overview_png

    png = overview_png(summary)
    if png is None:
        return []
    return ["<h2>Overview</h2>",
            f'<figure><img alt="overview" src="{png_data_uri(png)}"><figcaption>Left: clean accuracy against attack '
            "success rate for every attack and defence (mean and standard deviation over seeds; top left is a "
            "working backdoor, bottom right a working defence). Then the defence effectiveness rating per "
            "defence, and ASR and clean accuracy against each attack parameter the grid varies.</figcaption>"
            "</figure>"]


def write_report(out: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Write ``out/report.html`` and ``out/results.md``; returns their paths."""
    out = Path(out)
    rows = load_rows(out)
    summary = summarize(rows)
    name = title
    if name is None:
        try:
            name = json.loads((out / "config.json").read_text()).get("name")
        except (OSError, ValueError):
            name = None
        name = name or out.name
    md = f"# {name}\n\n" + markdown_table(summary)
    seeds = max((s["n"] + s.get("failed", 0) for s in summary), default=1)
    if seeds > 1:
        md += "\nValues are mean ± standard deviation over seeds; d_* are differences to the clean baseline.\n"
    md_path = out / "results.md"
    atomic_write_text(md_path, md)

    scols = summary_columns(summary)
    run_cols = ["run"] + [c for c in GRID_COLUMNS if c not in ("run", "key") and any(r.get(c) not in (None, "")
                                                                                     for r in rows)
                          and (c not in ("dataset", "model", "training") or len({r.get(c) for r in rows}) > 1)]
    parts = [f"<h1>{html.escape(name)}</h1>",
             f'<p class="note">{len(rows)} runs. Summary over seeds: mean ± standard deviation; d_clean_acc and '
             f"d_macro_f1 are differences to the clean baseline of the same cell; ASR, robust accuracy and DER "
             f"follow BackdoorBench. Click a column header to sort.</p>",
             *_overview(summary),
             "<h2>Results</h2>", _table(summary, scols, "summary", std=True),
             "<h2>All runs</h2>", _table(rows, run_cols, "runs", std=False), "<h2>Per run</h2>"]
    for r in rows:
        detail_file = out / "runs" / f"{r['run']}.json"
        figs = []
        err = ""
        if detail_file.is_file():
            try:
                detail = json.loads(detail_file.read_text())
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                warnings.warn(f"{detail_file}: run {r['run']}: not valid JSON ({type(e).__name__}); its plots are "
                              "skipped", stacklevel=2)
                detail = {}
            if not isinstance(detail, dict):
                warnings.warn(f"{detail_file}: run {r['run']}: expected a JSON object, found "
                              f"{type(detail).__name__}; its plots are skipped", stacklevel=2)
            figs = _plot_figures(out, r["run"], detail)
        if r.get("error"):
            err = f'<p class="note">failed: {html.escape(str(r["error"]))}</p>'
        parts.append(f"<details><summary>{html.escape(r['run'])}</summary>{err}{''.join(figs)}</details>")
    html_path = out / "report.html"
    atomic_write_text(html_path, html_page(name, parts, _CSS, _JS))
    return html_path, md_path
