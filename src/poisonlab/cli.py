"""The ``poisonlab`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from poisonlab.errors import PoisonlabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Training-data poisoning of image classifiers: attack, train, defend, measure.")
console = Console(stderr=False)
err_console = Console(stderr=True)


def _fail(e: Exception) -> None:
    # escape: messages quote user input and ranges such as "[0, 9]" that rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: Path = typer.Argument(..., help="experiment config (.toml or .yaml)"),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="output directory"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where datasets live (else $POISONLAB_DATA, cache)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (runs, reuse, time estimate) and stop"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="artifact cache shared by grids and workers "
                                                                "(default OUT/cache)"),
    executor: str = typer.Option("local", "--executor", help="local (in-process) or ray"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (else a local Ray is started)"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the local Ray instance"),
    cpus_per_run: float = typer.Option(1.0, "--cpus-per-run", help="CPUs each Ray task asks for"),
    gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help="GPUs each Ray task asks for"),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="log every run to this MLflow tracking URI"),
) -> None:
    """Run an experiment grid: clean baselines, one model per attack, each defence; write results to OUT.

    Any axis of the config may be a list. Finished runs in OUT are skipped, so
    re-running an interrupted command resumes it; trained models and other
    stages come from the cache.
    """
    from poisonlab.experiments import load_config, run_experiment

    try:
        cfg = load_config(config)
        rows = run_experiment(cfg, out, str(data_dir) if data_dir else None, progress=not quiet,
                              log=lambda s: console.print(s, highlight=False, markup=False, soft_wrap=True),
                              cache_dir=cache, executor=executor, address=address, num_cpus=num_cpus,
                              cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, dry_run=dry_run,
                              mlflow_uri=mlflow)
    except PoisonlabError as e:
        _fail(e)
    if dry_run:
        return
    _summary(rows)
    console.print(f"results: {out / 'results.csv'}  (per-run JSON in {out / 'runs'}, plots in {out / 'plots'}, "
                  f"report in {out / 'report.html'})", highlight=False)


@app.command()
def report(results_dir: Path = typer.Argument(..., help="a directory written by `poisonlab run`")) -> None:
    """(Re)write RESULTS_DIR/report.html (self-contained) and RESULTS_DIR/results.md."""
    from poisonlab.report.html import write_report

    try:
        html_path, md_path = write_report(results_dir)
    except PoisonlabError as e:
        _fail(e)
    console.print(f"wrote {html_path} and {md_path}", highlight=False)


def _summary(rows: list[dict]) -> None:
    cols = ["dataset", "model", "training", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr",
            "robust_acc", "der", "det_f1", "train_seconds"]
    cols = [c for c in cols if any(isinstance(r.get(c), (int, float, str)) and r.get(c) == r.get(c)
                                   and r.get(c) is not None for r in rows)
            and (c not in ("dataset", "model", "training") or len({r.get(c) for r in rows}) > 1)]
    t = Table(title="results")
    for c in cols:
        t.add_column(c, justify="left" if c in ("dataset", "model", "training", "attack", "defense") else "right")
    for r in rows:
        t.add_row(*[_cell(r.get(c)) if not r.get("error") or c in ("attack", "defense", "seed") else "failed"
                    for c in cols])
    console.print(t)
    failed = [r for r in rows if r.get("error")]
    if failed:
        console.print(f"{len(failed)} run(s) failed (errors in results.csv, tracebacks in runs/<run>.json):",
                      highlight=False)
        for r in failed:
            console.print(f"  {r['run']}: {r['error']}", highlight=False, markup=False, soft_wrap=True)


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return "-" if v is None else str(v)


@app.command("list")
def list_cmd() -> None:
    """List datasets, models (with parameter counts), attacks and defences with their defaults."""
    from poisonlab.attacks import ATTACKS
    from poisonlab.data import DATASETS
    from poisonlab.defenses import DEFENSES
    from poisonlab.models import MODEL_NOTES, MODELS, build_model, count_parameters

    t = Table(title="datasets")
    t.add_column("name")
    t.add_column("description")
    for k, v in DATASETS.items():
        t.add_row(k, v)
    console.print(t)
    t = Table(title="models (parameters on 32x32x3, 10 classes; mnist_cnn on 28x28x1)")
    for c in ("name", "parameters", "description"):
        t.add_column(c)
    for name in MODELS.names():
        shape = (1, 28) if name == "mnist_cnn" else (3, 32)
        m = build_model(name, shape[0], 10, shape[1])
        t.add_row(name, f"{count_parameters(m):,}", MODEL_NOTES.get(name, ""))
    console.print(t)
    for title, reg in (("attacks", ATTACKS), ("defenses", DEFENSES)):
        t = Table(title=title)
        for c in ("name", "kind", "parameters (defaults)", "summary"):
            t.add_column(c)
        for name in reg.names():
            obj = reg.get(name)
            kind = getattr(obj, "family", None) or getattr(obj, "kind", "")
            doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
            params = ", ".join(f"{k}={v!r}" for k, v in reg.defaults(name).items())
            t.add_row(name, str(kind), params, doc)
        console.print(t)


def _register_commands() -> None:
    """Each module in ``poisonlab.commands`` adds its commands with ``register(app)``."""
    import importlib
    import pkgutil

    import poisonlab.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}").register(app)


_register_commands()


def main() -> None:
    try:
        app()
    except PoisonlabError as e:  # pragma: no cover - safety net for commands without their own handler
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
