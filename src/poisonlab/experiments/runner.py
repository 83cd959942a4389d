"""Run an experiment grid: plan, execute (local or Ray), write results and the report.

Per cell (dataset x model x recipe x seed) the clean model is trained once and
passed to attacks that need a surrogate; each poisoned model is trained once
and shared by every defence; every stage is cached (see
:mod:`poisonlab.experiments.cache`), so re-running a grid, or a grid that
shares settings with an earlier one, only computes what is new. Outputs:

- ``OUT/results.csv`` and ``OUT/results.json``: one row per run, rewritten
  atomically after each run (``results.json`` is what a resumed run reads);
- ``OUT/runs/<run>.json``: full metrics, history, poisoning record, plots;
- ``OUT/plots/``: PNGs; ``OUT/report.html`` and ``OUT/results.md`` at the end;
- ``OUT/cache/`` (or ``cache_dir``): the artifact cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.config import ExperimentConfig
from poisonlab.experiments.executors import GridProgress, run_local, run_ray
from poisonlab.experiments.plan import Plan, build_plan, load_result_rows
from poisonlab.experiments.stages import dataset_splits
from poisonlab.report.tables import write_results
from poisonlab.utils import atomic_write_json

__all__ = ["run_experiment", "plan_experiment"]


def plan_experiment(cfg: ExperimentConfig, out: str | Path, cache_dir: str | Path | None = None,
                    estimate: bool = True) -> Plan:
    """The plan for ``cfg`` writing to ``out``: runs, what is done, what the cache holds, a time estimate."""
    out = Path(out)
    return build_plan(cfg, out, ArtifactCache(cache_dir or out / "cache"), estimate=estimate)


def run_experiment(cfg: ExperimentConfig, out: str | Path, data_dir: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = print, *, cache_dir: str | Path | None = None,
                   executor: str = "local", address: str | None = None, num_cpus: int | None = None,
                   cpus_per_run: float = 1, gpus_per_run: float = 0, dry_run: bool = False,
                   mlflow_uri: str | None = None, report: bool = True) -> list[dict[str, Any]]:
    """Run the grid ``cfg`` and write results under ``out``; returns the rows of every run in the plan.

    Runs already finished in ``out`` with the same settings are skipped; failed
    ones are retried. A failing run is recorded with its ``error`` and the grid
    goes on. ``dry_run`` prints the plan and returns the rows already there.
    """
    from poisonlab.errors import ConfigError

    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    import torch

    torch.set_float32_matmul_precision("high")
    out = Path(out)
    cache = ArtifactCache(cache_dir or out / "cache")
    plan = build_plan(cfg, out, cache)
    log(f"{cfg.name}: " + plan.describe())
    old = {r["run"]: r for r in load_result_rows(out)}
    rows: dict[str, dict[str, Any]] = {r: old[r] for r in plan.done}
    # data present, attacks and models fit it: before any work (and in a dry run, which promises a runnable plan)
    loaded = check_attacks_fit(plan, data_dir) if plan.units else {}
    if dry_run:
        return [rows[r] for r in plan.runs if r in rows]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.model_dump())
    on_rows = _row_sink(plan, out, rows, mlflow_uri)
    view = GridProgress(plan, log)
    if executor == "ray":
        run_ray(plan, out, cache, data_dir, on_rows, view, address=address, num_cpus=num_cpus,
                cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, log=log)
    else:
        run_local(plan, out, cache, data_dir, progress, on_rows, view, preloaded=loaded)
    final = [rows[r] for r in plan.runs if r in rows]
    write_results(out, final)
    if report and final:
        from poisonlab.report.html import write_report

        html, md = write_report(out)
        log(f"report: {html} and {md}")
    log(f"{cfg.name}: {view.done} run(s) done now, {len(plan.done)} earlier, {view.failed} failed")
    return final


def check_attacks_fit(plan: Plan, data_dir: str | None) -> dict[str, Any]:
    """Load each cell's data and check every attack and model against it, so that what does not fit
    the data (a target class it lacks, a trigger larger than its images, a network whose kernels are
    larger than the images) fails before any training. Returns the loaded data by data key, for the
    executor to reuse."""
    loaded: dict[str, Any] = {}
    models_checked: set[tuple[str, str]] = set()
    for cell in plan.cells:
        if cell.data_key not in loaded:
            loaded[cell.data_key] = data = dataset_splits(cell.dataset, data_dir)
            for attack in plan.attacks:
                attack.build().check(data.train)
        key = (cell.data_key, repr(cell.model))
        if key not in models_checked:
            models_checked.add(key)
            check_model_fits(cell, loaded[cell.data_key].train)
    return loaded


def check_model_fits(cell: Any, train: Any) -> None:
    """Build the cell's model for ``train`` and run two of its images through it; a failure is a
    ConfigError naming the model and the image shape."""
    import torch

    from poisonlab.data.imageset import float_nchw
    from poisonlab.errors import ConfigError
    from poisonlab.models import build_model_for

    m = cell.model
    try:
        model = build_model_for(m.name, train, feature_layer=m.feature_layer, **m.params).eval()
        x = float_nchw(train.images[:2])
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as e:
        h, w, c = train.images.shape[1:]
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"[model] name = {m.name!r} cannot take the {cell.labels.get('dataset', 'dataset')} images "
                          f"({h}x{w}x{c}): {first}") from None


def _row_sink(plan: Plan, out: Path, rows: dict[str, dict[str, Any]], mlflow_uri: str | None
              ) -> Callable[[Any, list[dict[str, Any]]], None]:
    """``on_rows(unit, new_rows)``: keep the rows, rewrite the results table, log to MLflow if asked."""
    tracker = None
    if mlflow_uri:
        from poisonlab.experiments.tracking import MlflowTracker

        tracker = MlflowTracker(mlflow_uri, plan.cfg.name)

    def on_rows(unit: Any, new: list[dict[str, Any]]) -> None:
        for r in new:
            rows[r["run"]] = r
        write_results(out, [rows[r] for r in plan.runs if r in rows])
        if tracker is not None:
            for r in new:
                tracker.log_run(out, r)

    return on_rows
