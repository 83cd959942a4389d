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

import json
from pathlib import Path
from typing import Any, Callable

from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.config import ExperimentConfig
from poisonlab.experiments.executors import GridProgress, run_local, run_ray
from poisonlab.experiments.plan import Plan, build_plan
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
    rows: dict[str, dict[str, Any]] = dict(plan.earlier_rows)
    # data present, attacks and models fit it: before any work (and in a dry run, which promises a runnable plan)
    loaded = check_attacks_fit(plan, data_dir) if plan.units else {}
    if dry_run:
        return [rows[r] for r in plan.runs if r in rows]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.model_dump())
    if plan.renamed:
        rename_earlier_runs(plan, out)
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
            check_trusted_set(plan, data.train)
        key = (cell.data_key, repr(cell.model))
        if key not in models_checked:
            models_checked.add(key)
            check_model_fits(cell, loaded[cell.data_key].train)
    return loaded


def check_trusted_set(plan: Plan, train: Any) -> None:
    """Refuse, before any training, a defence whose trusted clean set would be too small.

    The trusted set is ``clean_fraction`` of the training set (at least one image per class, see
    :meth:`~poisonlab.experiments.stages.Workspace.trusted_set`); a defence declares the images per
    class it needs as ``min_clean_per_class``.
    """
    from poisonlab.errors import ConfigError

    k, n, frac = train.num_classes, len(train), plan.cfg.clean_fraction
    have = max(k, int(frac * n))
    for d in plan.defenses:
        per_class = type(d.build()).min_clean_per_class
        if per_class and have < per_class * k:
            raise ConfigError(f"defense {d.label}: the trusted clean set would hold {have} images (clean_fraction "
                              f"{frac} of {n}), fewer than the {per_class * k} it needs ({per_class} per class for "
                              f"{k} classes); raise clean_fraction to at least {per_class * k / n:.3g}")


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


def rename_earlier_runs(plan: Plan, out: Path) -> None:
    """Give the rows ``out`` holds under older names (see :attr:`Plan.renamed`) their current names.

    Each finished run's ``runs/<old>.json`` is rewritten as ``runs/<new>.json`` (its row renamed; the
    plots it names keep their files), ``results.json`` / ``results.csv`` are rewritten with the new
    names, and only then are the old run files removed, so a process killed at any point leaves a
    folder that the report reads and the next run resumes. Old names are taken from a file anyone could
    have edited: one that is not a plain file name inside ``runs/`` is left alone.
    """
    runs_dir = out / "runs"
    details: dict[str, Any] = {}
    for new, old in plan.renamed.items():
        src = _run_file(runs_dir, old)
        if new not in plan.done or src is None:
            continue
        try:
            detail = json.loads(src.read_text())
        except (OSError, ValueError):
            continue  # a missing or damaged run file: the row stays, the report warns about the file
        if isinstance(detail, dict):
            if isinstance(detail.get("row"), dict):
                detail["row"] = dict(detail["row"], run=new)
            details[new] = detail
    for new, detail in details.items():
        atomic_write_json(runs_dir / f"{new}.json", detail)
    write_results(out, [plan.earlier_rows[r] for r in plan.runs if r in plan.earlier_rows])
    for old in set(plan.renamed.values()) - set(plan.runs):
        src = _run_file(runs_dir, old)
        if src is not None:
            src.unlink(missing_ok=True)


def _run_file(runs_dir: Path, name: str) -> Path | None:
    """``runs_dir/<name>.json`` when ``name`` is a plain file name (no separator, not . or ..), else None."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).name != name:
        return None
    f = runs_dir / f"{name}.json"
    return f if f.is_file() and not f.is_symlink() else None


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
