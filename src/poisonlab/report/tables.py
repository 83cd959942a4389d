"""Result tables: one row per run (``results.csv`` / ``results.json``) and the summary over seeds.

The one writer of result tables: grids (``poisonlab run``) and federated runs
(``poisonlab federated``) both write theirs with :func:`write_table`; the report
reads them back with :func:`load_rows` and summarises them with :func:`summarize`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from poisonlab.utils import atomic_write_json, atomic_write_text

# the columns every results table starts with (federated runs write these, then their own)
BASE_COLUMNS = [
    "run", "dataset", "model", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr", "robust_acc",
    "target_success", "der", "det_precision", "det_recall", "det_f1", "det_auroc", "n_poisoned",
    "poison_seconds", "train_seconds", "defense_seconds", "error",
]
# a grid's results.csv: the base columns plus the recipe axis, deltas to the baseline and the cache key
GRID_COLUMNS = [
    "run", "dataset", "model", "training", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr",
    "robust_acc", "target_success", "der", "det_precision", "det_recall", "det_f1", "det_auroc", "n_poisoned",
    "d_clean_acc", "d_macro_f1", "poison_seconds", "train_seconds", "defense_seconds", "error", "key",
]
GROUP = ("dataset", "model", "training", "attack", "defense")
# columns of the summary tables (report.html, results.md), in order; absent ones are left out
SUMMARY_METRICS = ["clean_acc", "d_clean_acc", "macro_f1", "d_macro_f1", "asr", "robust_acc", "target_success",
                   "der", "det_precision", "det_recall", "det_f1", "det_auroc", "psnr", "ssim", "linf",
                   "poison_seconds", "train_seconds", "defense_seconds"]


INT_COLUMNS = {"n", "seed", "n_poisoned", "n_flagged", "failed"}


def as_number(v: Any) -> float | None:
    """``v`` as a float, or None for booleans, None, empty strings, non-numbers and NaN."""
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def spreadsheet_safe(text: str) -> str:
    """``text`` with a leading apostrophe when a spreadsheet would read it as a formula (it starts with
    = + - @, a tab or a carriage return and is not a number): names from folders and configs are input."""
    if text and text[0] in "=+-@\t\r":
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


def _csv_cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return spreadsheet_safe(" ".join(map(str, v)))
    if isinstance(v, dict):
        return ""
    if isinstance(v, str):
        return spreadsheet_safe(v)
    return "" if v is None else v


def table_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text: ``columns`` first, then every other key of the rows in order of appearance.

    Floats are written with 6 significant digits (NaN as empty), lists as space-separated
    values; keys holding dicts are left to the JSON file.
    """
    cols = list(columns)
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, dict)]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: _csv_cell(r.get(k)) for k in cols})
    return buf.getvalue()


def write_table(out: Path, name: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """``out/<name>.csv`` (flat, for spreadsheets) and ``out/<name>.json`` (typed), each written atomically."""
    atomic_write_json(out / f"{name}.json", list(rows))
    atomic_write_text(out / f"{name}.csv", table_csv(rows, columns))


def write_results(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A grid's ``results.csv`` and ``results.json`` (what a resumed run reads)."""
    write_table(out, "results", rows, GRID_COLUMNS)


def load_rows(out: Path) -> list[dict[str, Any]]:
    """Result rows of ``out``: results.json if present, else results.csv (values as strings).

    The folder may not be ours: a file that is not a list of JSON objects each with a string ``run``
    (truncated, ``{}``, ``[1, 2, 3]``, not UTF-8) is a :class:`~poisonlab.errors.ConfigError` naming it.
    """
    from poisonlab.errors import ConfigError

    f = out / "results.json"
    if f.is_file():
        try:
            rows = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{f}: not UTF-8 text (is this a poisonlab results file?)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); a truncated file? "
                              "`poisonlab run` with the same config and --out rewrites it") from None
    elif (out / "results.csv").is_file():
        f = out / "results.csv"
        try:
            with open(f, newline="", encoding="utf-8") as fh:
                rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(fh)]
        except (UnicodeDecodeError, csv.Error) as e:
            raise ConfigError(f"{f}: not a readable CSV table ({type(e).__name__})") from None
    else:
        raise ConfigError(f"{out}: no results.json or results.csv here (is this a poisonlab results directory?)")
    if not isinstance(rows, list):
        raise ConfigError(f"{f}: expected a list of result rows (JSON objects), found {_json_kind(rows)}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("run"), str):
            found = _json_kind(r) if not isinstance(r, dict) else "an object without a string 'run'"
            raise ConfigError(f"{f}: row {i} must be a result row (an object with a string 'run'), found {found}")
    return rows


def _json_kind(v: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return kinds.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (dataset, model, training, attack, defence) over seeds.

    Each summary row has the group keys, ``n`` (successful seeds), ``failed``,
    and for every metric ``<m>`` its mean ``<m>`` and sample std ``<m>_std``
    (NaN with one seed).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        s: dict[str, Any] = dict(zip(GROUP, key)) | {"n": len(ok), "failed": len(rs) - len(ok),
                                                      "runs": [r["run"] for r in rs]}
        if len(ok) < len(rs):
            s["error"] = next(r["error"] for r in rs if r.get("error"))
        for m in SUMMARY_METRICS:
            vals = [v for v in (as_number(r.get(m)) for r in ok) if v is not None]
            if vals:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
                s[m], s[m + "_std"] = mean, std
        out.append(s)
    return out


def summary_columns(summary: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in GROUP if len({s.get(k) for s in summary}) > 1 or k in ("attack", "defense")]
    return keys + ["n"] + [m for m in SUMMARY_METRICS if any(m in s for s in summary)]


def format_value(col: str, mean: Any, std: Any = None) -> str:
    v = as_number(mean)
    if v is None:
        return "-" if not isinstance(mean, str) else mean
    if col in INT_COLUMNS and float(v).is_integer():
        return str(int(v))
    digits = 1 if col.endswith("_seconds") else 3
    sign = "+" if col.startswith("d_") and v > 0 else ""
    text = f"{sign}{v:.{digits}f}"
    sd = as_number(std)
    if sd is not None:
        text += f" ± {sd:.{digits}f}"
    return text


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The summary as a GitHub-flavoured Markdown table (mean ± std over seeds)."""
    cols = summary_columns(summary)
    head = "| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    body = []
    for s in summary:
        cells = [str(s.get(c, "")) if c in GROUP else format_value(c, s.get(c), s.get(c + "_std")) for c in cols]
        if s.get("failed"):
            cells[cols.index("n")] += f" ({s['failed']} failed)"
        body.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return head + "\n".join(body) + "\n"
