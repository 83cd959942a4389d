"""The results table: one row per run (results.csv / results.json) and the per-cell summary over seeds."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Iterable

from poisonlab.utils import atomic_write_json, atomic_write_text

# the columns every results table starts with (federated runs write these too)
BASE_COLUMNS = [
    "run", "dataset", "model", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr", "robust_acc",
    "target_success", "der", "det_precision", "det_recall", "det_f1", "det_auroc", "n_poisoned",
    "poison_seconds", "train_seconds", "defense_seconds", "error",
]
# a grid's results.csv: the base columns plus the recipe axis, deltas to the baseline and the cache key
RESULT_COLUMNS = [
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


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return ""
    return "" if v is None else v


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv`` (flat, for spreadsheets) and ``results.json`` (typed, what resume reads), atomically."""
    cols = list(RESULT_COLUMNS)
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: _fmt_cell(r.get(k)) for k in cols})
    atomic_write_json(out / "results.json", rows)
    atomic_write_text(out / "results.csv", buf.getvalue())


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
            vals = [v for v in (_num(r.get(m)) for r in ok) if v is not None]
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
    v = _num(mean)
    if v is None:
        return "-" if not isinstance(mean, str) else mean
    if col in INT_COLUMNS and float(v).is_integer():
        return str(int(v))
    digits = 1 if col.endswith("_seconds") else 3
    sign = "+" if col.startswith("d_") and v > 0 else ""
    text = f"{sign}{v:.{digits}f}"
    sd = _num(std)
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
