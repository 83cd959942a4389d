"""``poisonlab run CONFIG --out DIR``: run an experiment grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from poisonlab.commands._common import (FORMAT_HELP, OutputFormat, console, fail, log_stderr, logger_for, print_summary,
                                        stdout_for_data, strict_json, write_stdout)


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        config: Path = typer.Argument(..., help="experiment config (.toml or .yaml)"),
        out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="output directory"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                                help="where datasets live (else $POISONLAB_DATA, cache)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (runs, reuse, time estimate) and stop"),
        cache: Optional[Path] = typer.Option(None, "--cache", help="artifact cache shared by grids and workers "
                                                                    "(default OUT/cache)"),
        executor: str = typer.Option("local", "--executor", help="local (in-process) or ray"),
        address: Optional[str] = typer.Option(None, "--address",
                                              help="Ray cluster address (else a local Ray is started)"),
        num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the local Ray instance"),
        cpus_per_run: float = typer.Option(1.0, "--cpus-per-run", help="CPUs each Ray task asks for"),
        gpus_per_run: float = typer.Option(0.0, "--gpus-per-run", help="GPUs each Ray task asks for"),
        mlflow: Optional[str] = typer.Option(None, "--mlflow", help="log every run to this MLflow tracking URI"),
        device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present, else the CPU), cpu, "
                                             "cuda or cuda:N; overrides the config's device"),
        fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", case_sensitive=False,
                                         help="the end-of-run summary: " + FORMAT_HELP),
    ) -> None:
        """Run an experiment grid: clean baselines, one model per attack, each defence; write results to OUT.

        Any axis of the config may be a list. Finished runs in OUT are skipped, so
        re-running an interrupted command resumes it; trained models and other
        stages come from the cache.

        Exit status: 0 when every run succeeded; 1 when some run failed (the others are
        written, failures are listed and kept in results.csv); 2 when the input was refused
        before any work started.

        --format csv / json print every row of the grid on stdout (the columns of results.csv; in
        json NaN is null) and send the plan and progress to stderr; with --dry-run, the rows
        already finished in OUT.
        """
        from poisonlab.errors import PoisonlabError
        from poisonlab.experiments import load_config, run_experiment
        from poisonlab.experiments.config import with_device

        if out.exists() and not out.is_dir():
            fail(f"--out {out}: exists and is not a directory")
        try:
            cfg = load_config(config)
            if device is not None:
                cfg = with_device(cfg, device)
            with stdout_for_data(fmt):
                rows = run_experiment(cfg, out, str(data_dir) if data_dir else None, progress=not quiet,
                                      log=logger_for(fmt), cache_dir=cache, executor=executor, address=address,
                                      num_cpus=num_cpus, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                                      dry_run=dry_run, mlflow_uri=mlflow)
        except PoisonlabError as e:
            fail(e)
        failed = sum(1 for r in rows if r.get("error"))
        if fmt is not OutputFormat.table:
            from poisonlab.report.tables import GRID_COLUMNS, table_csv

            write_stdout(table_csv(rows, GRID_COLUMNS) if fmt is OutputFormat.csv else strict_json(rows))
            if failed:
                log_stderr(f"{failed} run(s) failed (their rows carry the error; tracebacks in {out / 'runs'})")
                raise typer.Exit(1)
            return
        if dry_run:
            return
        print_summary(rows)
        console.print(f"results: {out / 'results.csv'}  (per-run JSON in {out / 'runs'}, plots in {out / 'plots'}, "
                      f"report in {out / 'report.html'})", highlight=False, markup=False)
        if failed:  # what succeeded is written; the status says not everything did
            raise typer.Exit(1)
