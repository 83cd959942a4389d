"""Executors: run a plan's units in this process (``local``) or as Ray tasks (``ray``).

Units run in three waves, clean models first, then poisoned models, then
defences, so that every later unit finds what it needs in the shared cache
and nothing is trained twice. Inside a wave the Ray executor runs units in
parallel, each a task declaring ``num_cpus`` / ``num_gpus``; workers read and
write the same cache directory, which must therefore be on a path every node
sees (a shared file system on a real cluster).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.outputs import RunWriter
from poisonlab.experiments.plan import Plan, Unit, fmt_seconds, safe_name
from poisonlab.experiments.stages import Workspace
from poisonlab.utils import atomic_write_json

WAVES = ("clean", "attack", "defenses")
OnRows = Callable[[Unit, list[dict[str, Any]]], None]


class GridProgress:
    """One view over the grid: runs done / running / failed, time left; plus each running unit's stage."""

    def __init__(self, plan: Plan, log: Callable[[str], None], workers: int = 1):
        self.plan, self.log, self.workers = plan, log, max(1, workers)
        self.total = len(plan.todo)
        self.done = self.failed = 0
        self.trainings_done = 0
        self.trainings_left = plan.trainings_needed
        self.running: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def started(self, unit: Unit, text: str) -> None:
        self.running[unit.name] = text

    def finished(self, unit: Unit, rows: list[dict[str, Any]]) -> None:
        self.running.pop(unit.name, None)
        self.trainings_done += unit.trainings
        self.trainings_left = max(0, self.trainings_left - unit.trainings)
        for r in rows:
            if r.get("error"):
                self.failed += 1
            else:
                self.done += 1
            self.log(f"{self.line()}  {r['run']}: {_brief(r)}")

    def time_left(self) -> float | None:
        elapsed = time.perf_counter() - self.t0
        if self.trainings_done:
            per = elapsed / self.trainings_done
        elif self.plan.seconds_estimate is not None and self.plan.trainings_needed:
            per = self.plan.seconds_estimate / self.plan.trainings_needed / self.workers
        else:
            return None
        return per * self.trainings_left

    def line(self) -> str:
        left = self.time_left()
        return (f"[{self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed, "
                f"{fmt_seconds(time.perf_counter() - self.t0)} elapsed"
                + (f", ~{fmt_seconds(left)} left]" if left is not None else "]"))


def _brief(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"FAILED ({r['error'][:200]})"
    parts = []
    for k in ("clean_acc", "asr", "det_f1"):
        v = r.get(k)
        if isinstance(v, float) and v == v:
            parts.append(f"{k}={v:.4f}")
    return " ".join(parts)


def run_local(plan: Plan, out: Path, cache: ArtifactCache, data_dir: str | None, progress: bool,
              on_rows: OnRows, view: GridProgress, preloaded: dict[str, Any] | None = None) -> None:
    """Run every unit in this process, wave by wave (``preloaded``: data already loaded, by data key)."""
    ws = Workspace(plan, out, cache, data_dir, progress, status=view.running.__setitem__, preloaded=preloaded)
    for wave in WAVES:
        for unit in (u for u in plan.units if u.kind == wave):
            view.started(unit, unit.kind)
            emitted: set[int] = set()

            def emit(new: list[dict[str, Any]], unit: Any = unit) -> None:  # a defence's row, written at once
                emitted.update(id(r) for r in new)
                on_rows(unit, new)

            rows = ws.run_unit(unit, emit=emit)
            view.finished(unit, rows)
            rest = [r for r in rows if id(r) not in emitted]
            if rest or not emitted:
                on_rows(unit, rest)


# ---------------------------------------------------------------- Ray
_WORKSPACES: dict[str, Workspace] = {}


def _progress_file(out: str, unit_name: str) -> Path:
    return Path(out) / ".progress" / f"{safe_name(unit_name)}.json"


def ray_unit(plan: Plan, unit: Unit, out: str, cache_root: str, data_dir: str | None, threads: int) -> list[dict]:
    """One unit in a Ray worker (a module-level function so that workers import it, not unpickle code)."""
    import torch

    torch.set_num_threads(max(1, threads))
    key = f"{hash(plan.cfg.model_dump_json())}:{out}:{cache_root}"
    ws = _WORKSPACES.get(key)
    if ws is None:
        _WORKSPACES.clear()  # one plan at a time per worker: keep memory bounded
        ws = _WORKSPACES[key] = Workspace(plan, out, ArtifactCache(cache_root), data_dir, progress=False)

    def status(name: str, text: str) -> None:
        try:
            atomic_write_json(_progress_file(out, name), {"text": text, "pid": os.getpid(), "t": time.time()})
        except OSError:
            pass

    ws.status = status
    try:
        return ws.run_unit(unit)
    finally:
        try:
            _progress_file(out, unit.name).unlink()
        except OSError:
            pass


def run_ray(plan: Plan, out: Path, cache: ArtifactCache, data_dir: str | None, on_rows: OnRows, view: GridProgress,
            address: str | None = None, num_cpus: int | None = None, cpus_per_run: float = 1,
            gpus_per_run: float = 0, log: Callable[[str], None] = print) -> None:
    """Run units as Ray tasks: on the cluster at ``address``, or on a local Ray started with ``num_cpus``."""
    try:
        import ray
    except ImportError:
        from poisonlab.errors import ConfigError

        raise ConfigError("--executor ray needs Ray: pip install 'poisonlab[ray]'") from None
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            started = True
    try:
        res = ray.cluster_resources()
        view.workers = max(1, int(res.get("CPU", 1) // max(cpus_per_run, 1e-9)))
        log(f"ray: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; each run asks for "
            f"{cpus_per_run:g} CPU, {gpus_per_run:g} GPU")
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(ray_unit)
        plan_ref = ray.put(plan)
        threads = max(1, int(cpus_per_run))
        last_status = 0.0
        for wave in WAVES:
            pending = {task.remote(plan_ref, u, str(out), str(cache.root), data_dir, threads): u
                       for u in plan.units if u.kind == wave}
            for u in pending.values():
                view.started(u, "queued")
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a lost worker fails its runs, not the grid
                        writer = RunWriter(out, plan.cfg.plots)
                        rows = [writer.failed(r, e) for r in unit.runs if r.name not in plan.done]
                    view.finished(unit, rows)
                    on_rows(unit, rows)
                if time.perf_counter() - last_status > 10 and pending:
                    last_status = time.perf_counter()
                    _refresh_status(view, out, pending.values())
                    log(view.line() + "  running: " + "; ".join(
                        view.running.get(u.name, "queued") for u in list(pending.values())[:6]))
    finally:
        if started:
            ray.shutdown()


def _refresh_status(view: GridProgress, out: Path, units: Any) -> None:
    for u in units:
        try:
            view.running[u.name] = json.loads(_progress_file(str(out), u.name).read_text())["text"]
        except (OSError, ValueError, KeyError):
            pass
