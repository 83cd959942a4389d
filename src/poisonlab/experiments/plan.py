"""The grid planner: expand a config into cells, runs and units of work, and see what is already done.

A *cell* is one (dataset, model, training recipe, seed). In every cell there is
a baseline run (clean training set), one run per attack variant (the poisoned
model, no defence) and one run per (attack, defence). Work is grouped into
*units* that an executor runs: ``clean`` (train the baseline), ``attack``
(poison, train the poisoned model) and ``defenses`` (every defence of one
poisoned model, in one process so that they share features and
cross-validated predictions in memory).

Every stage has a cache key, a hash of exactly the settings that produced it:

- data: the dataset settings (name, subset sizes, image size, path);
- clean: data + model + recipe + seed;
- poison: data + attack (name and full parameters) + seed, + the clean key
  when the attack uses the clean model;
- victim (the poisoned model): poison + clean (model, recipe, seed);
- defence: victim + defence (name and full parameters) + clean_fraction.

Planning touches no data and no model: it builds the attack and defence
objects once per variant, hashes small JSON documents and checks file
existence, so a 1,000-run grid plans in well under a second.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poisonlab.experiments.cache import CACHE_VERSION, ArtifactCache, digest, jsonable
from poisonlab.experiments.config import ExperimentConfig


@dataclass
class Cell:
    index: int
    dataset: int
    model: int
    training: int
    seed: int
    labels: dict[str, str]
    prefix: list[str]
    data_key: str
    clean_key: str
    cost_key: str


@dataclass
class RunSpec:
    run: str
    kind: str  # baseline | attack | defense
    cell: int
    attack: int | None
    defense: int | None
    key: str
    attack_label: str = "none"
    defense_label: str = "none"


@dataclass
class Unit:
    kind: str  # clean | attack | defenses
    cell: int
    attack: int | None = None
    defenses: list[int] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    trainings: int = 0  # trainings this unit will do (cache misses)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.cell}:{self.attack}:{','.join(map(str, self.defenses))}"


@dataclass
class Plan:
    cfg: ExperimentConfig
    cells: list[Cell]
    runs: dict[str, RunSpec]
    attack_keys: dict[tuple[int, int], tuple[str, str]]  # (cell, attack) -> (poison key, victim key)
    attack_info: list[dict[str, Any]]
    defense_info: list[dict[str, Any]]
    units: list[Unit] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    failed_before: set[str] = field(default_factory=set)
    cached: dict[str, int] = field(default_factory=dict)
    trainings_needed: int = 0
    trainings_reused: int = 0
    seconds_estimate: float | None = None
    estimate_source: str = ""
    plan_seconds: float = 0.0

    @property
    def todo(self) -> list[str]:
        return [r for r in self.runs if r not in self.done]

    def describe(self) -> str:
        cfg = self.cfg
        n_att, n_def = len(cfg.attacks), len(cfg.defenses)
        per_cell = len(self.runs) // max(1, len(self.cells))
        lines = [
            f"plan: {len(self.runs)} runs = {len(cfg.dataset)} dataset(s) x {len(cfg.model)} model(s) x "
            f"{len(cfg.training)} recipe(s) x {len(cfg.seeds)} seed(s) x {per_cell} per cell "
            f"({'1 baseline + ' if cfg.baseline else ''}{n_att} attack(s) x (1 + {n_def} defence(s))"
            + ("; some defences limited by apply_to)" if any(d.apply_to for d in cfg.defenses) else ")"),
            f"  done already: {len(self.done)}; to run: {len(self.todo)}"
            + (f" (of which {len(self.failed_before)} failed before and are retried)" if self.failed_before else ""),
            f"  trainings: {self.trainings_needed} to do, {self.trainings_reused} reused from the cache "
            f"(clean models cached: {self.cached.get('clean', 0)}, poisoned sets: {self.cached.get('poison', 0)}, "
            f"poisoned models: {self.cached.get('victim', 0)}, defence outputs: {self.cached.get('defense', 0)})",
        ]
        if self.seconds_estimate is not None:
            lines.append(f"  estimate: ~{fmt_seconds(self.seconds_estimate)} of training on one worker "
                         f"({self.estimate_source})")
        else:
            lines.append("  estimate: unknown (no timing for this dataset/model yet)")
        return "\n".join(lines)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def slug(s: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")
    if len(out) > 120:  # keep file names short but distinct
        out = out[:108] + "-" + digest(s)[:11]
    return out


def _variant_labels(variants: list[dict[str, Any]], base: str | None) -> list[str]:
    """Readable labels: the name plus the settings that differ between variants."""
    if len(variants) == 1:
        return [variants[0].get("name", base or "")]
    keys = [k for k in variants[0] if k != "name" and len({json.dumps(v.get(k), sort_keys=True, default=str)
                                                            for v in variants}) > 1]
    out = []
    for v in variants:
        name = v.get("name", base or "")
        extra = ",".join(f"{k}={v.get(k)}" for k in keys)
        out.append(f"{name}({extra})" if extra else name)
    return out


def build_plan(cfg: ExperimentConfig, out: str | Path | None = None, cache: ArtifactCache | None = None,
               estimate: bool = True) -> Plan:
    """Expand ``cfg`` into cells, runs and units; mark runs done in ``out`` and stages present in ``cache``."""
    from poisonlab.attacks import get_attack
    from poisonlab.defenses import get_defense

    t0 = time.perf_counter()
    ds_dump = [d.model_dump(exclude={"data_dir", "download"}) for d in cfg.dataset]
    m_dump = [m.model_dump() for m in cfg.model]
    t_dump = [t.model_dump() for t in cfg.training]
    ds_labels = _variant_labels(ds_dump, None)
    m_labels = _variant_labels([{"name": m["name"], **m["params"]} for m in m_dump], None)
    t_labels = _variant_labels(t_dump, "train")
    data_keys = [digest({"v": CACHE_VERSION, "dataset": d}) for d in ds_dump]

    attack_info = []
    for m in cfg.attacks:
        a = get_attack(m.name, **m.params)
        attack_info.append({"label": m.label, "name": m.name, "params": jsonable(a.params()),
                            "needs_clean_model": bool(a.needs_clean_model), "family": a.family})
    defense_info = []
    for m in cfg.defenses:
        d = get_defense(m.name, **m.params)
        defense_info.append({"label": m.label, "name": m.name,
                             "params": jsonable(d.params()) | ({} if m.retrain else {"retrain": False}),
                             "retrains": bool(d.retrains) and m.retrain, "kind": d.kind})

    cells: list[Cell] = []
    runs: dict[str, RunSpec] = {}
    attack_keys: dict[tuple[int, int], tuple[str, str]] = {}
    units: list[Unit] = []
    for di in range(len(cfg.dataset)):
        for mi in range(len(cfg.model)):
            for ti in range(len(cfg.training)):
                cost_key = digest({"data": data_keys[di], "model": m_dump[mi], "training": t_dump[ti]})
                for seed in cfg.seeds:
                    prefix = ([ds_labels[di]] if len(cfg.dataset) > 1 else []) + \
                             ([m_labels[mi]] if len(cfg.model) > 1 else []) + \
                             ([t_labels[ti]] if len(cfg.training) > 1 else [])
                    clean_key = digest({"stage": "clean", "data": data_keys[di], "model": m_dump[mi],
                                        "training": t_dump[ti], "seed": seed})
                    cell = Cell(len(cells), di, mi, ti, seed, {"dataset": ds_labels[di], "model": m_labels[mi],
                                                               "training": t_labels[ti]},
                                prefix, data_keys[di], clean_key, cost_key)
                    cells.append(cell)

                    def add(kind: str, a: int | None, d: int | None, key: str) -> str:
                        al = attack_info[a]["label"] if a is not None else "none"
                        dl = defense_info[d]["label"] if d is not None else "none"
                        name = slug("-".join(prefix + [al, dl, f"s{seed}"]))
                        if name in runs:
                            raise ValueError(f"two runs would be named {name!r}")
                        runs[name] = RunSpec(name, kind, cell.index, a, d, key, al, dl)
                        return name

                    clean_unit = Unit("clean", cell.index)
                    if cfg.baseline:
                        clean_unit.runs.append(add("baseline", None, None, clean_key))
                    units.append(clean_unit)
                    for ai, info in enumerate(attack_info):
                        poison_key = digest({"stage": "poison", "data": data_keys[di], "attack": info["name"],
                                             "params": info["params"], "seed": seed,
                                             "clean": clean_key if info["needs_clean_model"] else None})
                        victim_key = digest({"stage": "victim", "poison": poison_key, "clean": clean_key})
                        attack_keys[(cell.index, ai)] = (poison_key, victim_key)
                        au = Unit("attack", cell.index, ai, runs=[add("attack", ai, None, victim_key)])
                        units.append(au)
                        du = Unit("defenses", cell.index, ai)
                        for dj, dinfo in enumerate(defense_info):
                            if not cfg.defenses[dj].applies_to(cfg.attacks[ai]):
                                continue
                            du.defenses.append(dj)
                            du.runs.append(add("defense", ai, dj, defense_key(victim_key, dinfo, cfg.clean_fraction)))
                        if du.defenses:
                            units.append(du)
    plan = Plan(cfg, cells, runs, attack_keys, attack_info, defense_info, units)
    if out is not None:
        _mark_done(plan, Path(out))
    if cache is not None:
        _mark_cached(plan, cache, estimate)
    plan.units = [u for u in plan.units if any(r not in plan.done for r in u.runs) or
                  (u.kind == "clean" and _clean_needed(plan, u))]
    plan.plan_seconds = time.perf_counter() - t0
    return plan


def defense_key(victim_key: str, dinfo: dict[str, Any], clean_fraction: float) -> str:
    return digest({"stage": "defense", "victim": victim_key, "defense": dinfo["name"], "params": dinfo["params"],
                   "clean_fraction": clean_fraction})


def _clean_needed(plan: Plan, u: Unit) -> bool:
    """A clean unit without a pending baseline run still runs if an unfinished attack needs the clean model."""
    cell = plan.cells[u.cell]
    return any(plan.attack_info[r.attack]["needs_clean_model"] and r.run not in plan.done
               for r in plan.runs.values() if r.cell == cell.index and r.attack is not None)


def load_result_rows(out: Path) -> list[dict[str, Any]]:
    f = out / "results.json"
    if not f.is_file():
        return []
    try:
        rows = json.loads(f.read_text())
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []


def _mark_done(plan: Plan, out: Path) -> None:
    for row in load_result_rows(out):
        spec = plan.runs.get(row.get("run"))
        if spec is None or row.get("key") != spec.key:
            continue  # a run of another config (or older settings) under the same name
        if row.get("error"):
            plan.failed_before.add(spec.run)
        else:
            plan.done.add(spec.run)


def _mark_cached(plan: Plan, cache: ArtifactCache, estimate: bool) -> None:
    cfg = plan.cfg
    counts = {"clean": 0, "poison": 0, "victim": 0, "defense": 0}
    needed = reused = 0
    per_cost: dict[str, int] = {}
    pending_clean = {u.cell for u in plan.units if u.kind == "clean" and
                     (any(r not in plan.done for r in u.runs) or _clean_needed(plan, u))}
    for cell in plan.cells:
        if cache.has("clean", cell.clean_key):
            counts["clean"] += 1
            if cell.index in pending_clean:
                reused += 1
        elif cell.index in pending_clean:
            needed += 1
            per_cost[cell.cost_key] = per_cost.get(cell.cost_key, 0) + 1
    for u in plan.units:
        if u.kind == "clean":
            continue
        cell = plan.cells[u.cell]
        poison_key, victim_key = plan.attack_keys[(u.cell, u.attack)]
        pending = [r for r in u.runs if r not in plan.done]
        if u.kind == "attack":
            counts["poison"] += cache.has("poison", poison_key)
            has_victim = cache.has("victim", victim_key)
            counts["victim"] += has_victim
            if pending:
                if has_victim:
                    reused += 1
                else:
                    u.trainings = 1
            continue
        for dj, run in zip(u.defenses, u.runs):
            has = cache.has("defense", plan.runs[run].key)
            counts["defense"] += has
            if plan.defense_info[dj]["retrains"] and run not in plan.done:
                if has:
                    reused += 1
                else:
                    u.trainings += 1
    for u in plan.units:
        if u.kind != "clean" and u.trainings:
            needed += u.trainings
            c = plan.cells[u.cell].cost_key
            per_cost[c] = per_cost.get(c, 0) + u.trainings
    for u in plan.units:
        if u.kind == "clean" and u.cell in pending_clean and not cache.has("clean", plan.cells[u.cell].clean_key):
            u.trainings = 1
    plan.cached, plan.trainings_needed, plan.trainings_reused = counts, needed, reused
    if not per_cost:
        plan.seconds_estimate, plan.estimate_source = 0.0, "nothing to train"
        return
    total, measured, benched = 0.0, 0, 0
    cost_cells = {c.cost_key: c for c in plan.cells}
    for ck, n in per_cost.items():
        s = cache.seconds(ck)
        if s is not None:
            measured += 1
        elif estimate:
            c = cost_cells[ck]
            s = bench_training_seconds(cfg.dataset[c.dataset], cfg.model[c.model], cfg.training[c.training])
            benched += s is not None
        if s is None:
            return
        total += s * n
    plan.seconds_estimate = total
    plan.estimate_source = ("from earlier trainings of the same settings" if not benched else
                            "from a few timed training steps on this machine" if not measured else
                            "earlier trainings and timed training steps")


# image shape and training-set size of the built-in datasets, so that planning reads no data
KNOWN_DATASETS = {"digits": ((8, 8, 1), 1437, 10), "mnist": ((28, 28, 1), 60000, 10),
                  "fashion_mnist": ((28, 28, 1), 60000, 10), "fashion-mnist": ((28, 28, 1), 60000, 10),
                  "cifar10": ((32, 32, 3), 50000, 10), "cifar-10": ((32, 32, 3), 50000, 10)}
_BENCH: dict[str, float | None] = {}


def bench_training_seconds(ds: Any, model: Any, training: Any) -> float | None:
    """Rough seconds for one training: a few timed SGD steps on random images of the dataset's shape."""
    known = KNOWN_DATASETS.get(ds.name)
    if known is None:
        return None
    (h, w, c), n, k = known
    n = min(n, ds.train_size or n)
    key = json.dumps([h, w, c, k, model.model_dump(), training.batch_size], sort_keys=True, default=str)
    if key not in _BENCH:
        import torch

        from poisonlab.models import build_model

        try:
            net = build_model(model.name, c, k, h, **model.params)
            bs = min(training.batch_size, 256)
            x, y = torch.rand(bs, c, h, w), torch.randint(0, k, (bs,))
            net.train()
            times = []
            # forward + backward dominate a step; torch.optim is left out because its first use imports
            # torch._dynamo, which costs more than the whole estimate
            for _ in range(3):
                t0 = time.perf_counter()
                net.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(x), y).backward()
                times.append(time.perf_counter() - t0)
            _BENCH[key] = min(times[1:]) / bs
        except Exception:  # an estimate must never stop a grid
            _BENCH[key] = None
    per_sample = _BENCH[key]
    return None if per_sample is None else per_sample * n * training.epochs * (1 - training.val_fraction) * 1.15
