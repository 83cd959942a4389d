"""What every sub-command shares: the consoles, the one error printer, the results summary table and the
``--format`` option (table for people, csv or json for scripts).

Only typer and rich are imported here, so that ``poisonlab --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import sys
from typing import Any, Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=False)
if not console.is_terminal:  # a pipe or a file: tables whole, not cut to 80 columns, for scripts to read
    console = Console(stderr=False, width=100_000)
err_console = Console(stderr=True)


def fail(e: BaseException | str) -> NoReturn:
    """Print ``error: <message>`` on stderr (one sentence, no traceback) and exit with status 2."""
    # escape: messages quote user input and ranges such as "[0, 9]" that rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def log(text: str) -> None:
    """A progress line on stdout, printed as it is (no markup, no highlighting)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def log_stderr(text: str) -> None:
    """A progress line on stderr (when stdout carries csv or json for a script)."""
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


class OutputFormat(str, enum.Enum):
    """``--format``: ``table`` (rich tables, for people), or ``csv`` / ``json`` on stdout for scripts."""

    table = "table"
    csv = "csv"
    json = "json"


FORMAT_HELP = ("table (for people), or csv / json on stdout for scripts (then nothing else goes to stdout: "
               "progress and status go to stderr)")


def logger_for(fmt: OutputFormat) -> Callable[[str], None]:
    """Where progress lines go: stdout under a table, stderr when stdout is for csv or json."""
    return log if fmt is OutputFormat.table else log_stderr


@contextlib.contextmanager
def stdout_for_data(fmt: OutputFormat) -> Iterator[None]:
    """With csv or json, rich's default console (what progress bars draw on when given none) is stderr
    while the block runs, so that stdout holds the data alone."""
    if fmt is OutputFormat.table:
        yield
        return
    import rich

    default = rich.get_console()
    saved = dict(default.__dict__)  # rich.reconfigure rewrites the global console in place; so is it put back
    rich.reconfigure(stderr=True)
    try:
        yield
    finally:
        default.__dict__.update(saved)


def strict_json(obj: Any) -> str:
    """``obj`` as standard JSON (what jq and browsers parse): NaN and infinities become null."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=2, allow_nan=False, default=str)


def write_stdout(text: str) -> None:
    """Data for a script, on stdout as it is (no rich: no wrapping, no markup)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


SUMMARY_COLUMNS = ["dataset", "model", "training", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr",
                   "robust_acc", "der", "det_f1", "train_seconds"]
TEXT_COLUMNS = ("dataset", "model", "training", "attack", "defense")


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The results as a table on stdout (columns with no value left out), then the failed runs."""
    from rich.table import Table
    from rich.text import Text  # cells as plain text: run names and parameters may hold "[...]"

    cols = [c for c in SUMMARY_COLUMNS if any(isinstance(r.get(c), (int, float, str)) and r.get(c) == r.get(c)
                                              and r.get(c) is not None for r in rows)
            and (c not in ("dataset", "model", "training") or len({r.get(c) for r in rows}) > 1)]
    t = Table(title="results")
    for c in cols:
        t.add_column(c, justify="left" if c in TEXT_COLUMNS else "right")
    for r in rows:
        t.add_row(*[Text(_cell(r.get(c)) if not r.get("error") or c in ("attack", "defense", "seed") else "failed")
                    for c in cols])
    console.print(t)
    failed = [r for r in rows if r.get("error")]
    if failed:
        console.print(f"{len(failed)} run(s) failed (errors in results.csv, tracebacks in runs/<run>.json):",
                      highlight=False, markup=False)
        for r in failed:
            console.print(f"  {r['run']}: {r['error']}", highlight=False, markup=False, soft_wrap=True)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return "-" if v is None else str(v)
