"""The grid planner: expand a config into cells, runs and units of work, and see what is already done.

A *cell* is one (dataset, model, training recipe, seed). In every cell there is
a baseline run (clean training set), one run per attack variant (the poisoned
model, no defence) and one run per (attack, defence). Work is grouped into
*units* that an executor runs: ``clean`` (train the baseline), ``attack``
(poison, train the poisoned model) and ``defenses`` (every defence of one
poisoned model, in one process so that they share features and
cross-validated predictions in memory).

Everything the planner decides is a frozen record: :class:`AttackVariant`,
:class:`DefenseVariant`, :class:`Cell`, :class:`Run` (its cell, its variants
and its cache keys), :class:`Unit` and the :class:`Plan` itself, so a stage
reads ``run.attack.label`` or ``run.victim_key``, never a look-up by index.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from poisonlab.experiments.cache import CACHE_VERSION, ArtifactCache, digest, jsonable
from poisonlab.experiments.config import DatasetConfig, ExperimentConfig, MethodConfig, ModelConfig
from poisonlab.training.loop import TrainConfig


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class AttackVariant:
    """One attack of the config with one value per parameter (list-valued parameters expanded)."""

    index: int  # position among the config's expanded attacks
    label: str  # the readable id in run names and tables, e.g. "badnets(rate=0.1)"
    name: str
    params: dict[str, Any]  # every constructor parameter, defaults included, as JSON (the cache key's part)
    config: MethodConfig  # as written: what builds it
    needs_clean_model: bool
    family: str

    def build(self) -> Any:
        """A fresh attack object."""
        from poisonlab.attacks import get_attack

        return get_attack(self.name, **self.config.params)


@dataclass(frozen=True)
class DefenseVariant:
    """One defence of the config with one value per parameter."""

    index: int  # position among the config's expanded defences
    label: str
    name: str
    params: dict[str, Any]  # full parameters, plus retrain=False for a detect-only filter
    config: MethodConfig
    retrains: bool  # whether running it trains a model (a training to count in the plan)
    kind: str

    def build(self) -> Any:
        """A fresh defence object (a detect-only filter with ``retrain = False``)."""
        from poisonlab.defenses import get_defense

        defense = get_defense(self.name, **self.config.params)
        if not self.config.retrain:
            defense.retrain = False
        return defense

    def applies_to(self, attack: AttackVariant) -> bool:
        return self.config.applies_to(attack.config)


@dataclass(frozen=True)
class Cell:
    """One (dataset, model, recipe, seed) of the grid and the cache keys that depend only on it."""

    index: int
    dataset: DatasetConfig
    model: ModelConfig
    training: TrainConfig
    seed: int
    labels: dict[str, str]  # dataset / model / training -> readable label
    prefix: tuple[str, ...]  # the labels of the axes with more than one value, for run names
    data_key: str
    clean_key: str
    cost_key: str  # data + model + recipe: runs that cost the same training time


@dataclass(frozen=True)
class Run:
    """One row of the results: the baseline, an attack's poisoned model, or a defence of it."""

    name: str
    kind: str  # baseline | attack | defense
    cell: Cell
    key: str  # cache key of the entry the row reports: clean, victim or defense
    attack: AttackVariant | None = None
    defense: DefenseVariant | None = None
    poison_key: str | None = None
    victim_key: str | None = None

    @property
    def attack_label(self) -> str:
        return self.attack.label if self.attack is not None else "none"

    @property
    def defense_label(self) -> str:
        return self.defense.label if self.defense is not None else "none"


@dataclass(frozen=True)
class Unit:
    """Work one executor task does: a clean model, an attack's poisoned model, or the defences of one."""

    kind: str  # clean | attack | defenses
    cell: Cell
    runs: tuple[Run, ...]
    attack: AttackVariant | None = None
    trainings: int = 0  # trainings this unit will do (cache misses)

    @property
    def defenses(self) -> tuple[DefenseVariant, ...]:
        return tuple(r.defense for r in self.runs if r.defense is not None)

    @property
    def name(self) -> str:
        attack = self.attack.index if self.attack is not None else None
        return f"{self.kind}:{self.cell.index}:{attack}:{','.join(str(d.index) for d in self.defenses)}"


@dataclass(frozen=True)
class Plan:
    """A config expanded into cells, runs and the units still to run, with what the cache already holds."""

    cfg: ExperimentConfig
    cells: tuple[Cell, ...]
    attacks: tuple[AttackVariant, ...]
    defenses: tuple[DefenseVariant, ...]
    runs: dict[str, Run]  # every run of the grid, in order
    units: tuple[Unit, ...]  # units with work left
    done: frozenset[str] = frozenset()
    failed_before: frozenset[str] = frozenset()
    earlier_rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # finished rows in out, by run name
    renamed: dict[str, str] = field(default_factory=dict)  # run name -> its row's name in out, where they differ
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
            + (f" (of which {len(self.failed_before)} failed before and are retried)" if self.failed_before else "")
            + (f"; {len(self.renamed)} finished or failed run(s) recognised by their key under an older name "
               "(renamed when the grid runs)" if self.renamed else ""),
            f"  trainings: {self.trainings_needed} to do, {self.trainings_reused} reused from the cache "
            f"(clean models cached: {self.cached.get('clean', 0)}, poisoned sets: {self.cached.get('poison', 0)}, "
            f"poisoned models: {self.cached.get('victim', 0)}, defence outputs: {self.cached.get('defense', 0)})",
        ]
        if self.cached.get("progress"):
            lines.append(f"  continuing: {self.cached['progress']} unfinished defence run(s) from their progress files "
                         "(CACHE/progress)")
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


# ------------------------------------------------------------------ run ids
ID_SEPARATOR = "+"
MAX_NAME_CHARS = 120
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_NAME_TRANSLATE = str.maketrans({"[": "(", "]": ")", "{": "(", "}": ")", ":": ".", "'": None, '"': None})
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.,=()~-]+")


def safe_name(text: str, max_chars: int = MAX_NAME_CHARS) -> str:
    """``text`` as a file name that is safe on Linux, macOS and Windows.

    Brackets and braces become parentheses, ``:`` a dot, quotes and the blank after a comma go; any other
    character outside ``A-Z a-z 0-9 _ . , = ( ) ~ -`` becomes ``_`` (so no ``/ \\ : * ? " < > |``,
    no blank, no ``+``: that is :data:`ID_SEPARATOR`). No leading dot or dash, no trailing dot, no
    Windows device name (``con``, ``nul``, ``com1``...) before the first dot. A name longer than
    ``max_chars`` is cut and ends in ``~`` and 10 hex digits of a hash of the whole ``text``, so two
    long names that share their start stay distinct.
    """
    return _bounded(_clean(text), text, max_chars)


def _clean(text: str) -> str:
    out = text.replace(", ", ",").replace(": ", ":").translate(_NAME_TRANSLATE)
    return re.sub(r"_{2,}", "_", _NAME_BAD.sub("_", out))


def _bounded(name: str, source: str, max_chars: int) -> str:
    """``name`` with no leading dot or dash, no trailing dot, no Windows device stem, at most ``max_chars``."""
    name = name.lstrip(".-").rstrip(". ") or "_"
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        name = "_" + name
    if len(name) > max_chars:
        name = name[: max_chars - 11].rstrip(".") + "~" + digest(source)[:10]
    return name


def run_id(parts: Iterable[str]) -> str:
    """The id of a run (``Run.name``, ``row["run"]``, ``runs/<id>.json``) from its readable parts.

    ``parts`` are the cell's varying axes (dataset, model, recipe; only those with more than one value
    in the config), the attack's label, the defence's label and ``s<seed>``, e.g.
    ``badnets(rate=0.1,size=3)+spectral_signatures+s0`` or ``mnist_cnn+none+none+s1``.

    Why this shape: ``+`` between parts reads as "this attack plus this defence" in a file listing and
    a table, and no part can hold one (:func:`safe_name` turns it into ``_``), so the id splits back
    into its parts; a method is written as in the config's own labels and in the tables' attack and
    defence columns, ``name(key=value,...)`` with the parameters the config gives (sorted), so the id
    of a run does not change when other attacks, defences or seeds are added to or removed from the
    config. Parentheses, ``=`` and ``,`` are legal in file names on Linux, macOS and Windows; square
    brackets are avoided because shells read them as globs and rich as markup. A cell axis (a second
    model, a second recipe) lists only the settings that differ between its values, to keep ids short:
    adding such a value renames the runs of the grid, and resuming recognises their finished rows by
    their ``key`` (see :func:`finished_runs`). Ids are at most :data:`MAX_NAME_CHARS` characters
    (then cut, with a hash tail), so ``runs/<id>.json`` and the plot files stay far below the 255
    bytes file systems allow.
    """
    parts = list(parts)
    return _bounded(ID_SEPARATOR.join(_clean(p) for p in parts), repr(parts), MAX_NAME_CHARS)


# ------------------------------------------------------------------ planning
def build_plan(cfg: ExperimentConfig, out: str | Path | None = None, cache: ArtifactCache | None = None,
               estimate: bool = True) -> Plan:
    """Expand ``cfg`` into cells, runs and units; mark runs done in ``out`` and stages present in ``cache``.

    ``estimate``: when the cache has no timing for a training, time a few training steps to estimate it.
    """
    t0 = time.perf_counter()
    attacks, defenses = attack_variants(cfg), defense_variants(cfg)
    cells = grid_cells(cfg)
    units = _distinct_names(tuple(u for cell in cells for u in cell_units(cfg, cell, attacks, defenses)))
    runs = {r.name: r for u in units for r in u.runs}
    finished = finished_runs(runs, Path(out)) if out is not None else Finished(frozenset(), frozenset(), {}, {})
    plan = Plan(cfg, cells, attacks, defenses, runs, units, finished.done, finished.failed,
                earlier_rows=finished.rows, renamed=finished.renamed)
    if cache is not None:
        plan = with_cache_status(plan, cache, estimate)
    pending = tuple(u for u in plan.units if has_work(plan, u))
    return replace(plan, units=pending, plan_seconds=time.perf_counter() - t0)


def attack_variants(cfg: ExperimentConfig) -> tuple[AttackVariant, ...]:
    """Every attack entry of ``cfg`` (already expanded), built once to read its full parameters."""
    from poisonlab.attacks import get_attack

    out = []
    for i, m in enumerate(cfg.attacks):
        a = get_attack(m.name, **m.params)
        out.append(AttackVariant(i, m.label, m.name, jsonable(a.params()), m, bool(a.needs_clean_model), a.family))
    return tuple(out)


def defense_variants(cfg: ExperimentConfig) -> tuple[DefenseVariant, ...]:
    """Every defence entry of ``cfg``; a detect-only filter (``retrain = false``) trains nothing."""
    from poisonlab.defenses import get_defense

    out = []
    for i, m in enumerate(cfg.defenses):
        d = get_defense(m.name, **m.params)
        params = jsonable(d.params()) | ({} if m.retrain else {"retrain": False})
        out.append(DefenseVariant(i, m.label, m.name, params, m, bool(d.retrains) and m.retrain, d.kind))
    return tuple(out)


def dataset_key_dump(d: DatasetConfig) -> dict[str, Any]:
    """The dataset settings that change the data (where it lives does not); unset new fields are left
    out so that keys of configs written before them stay the same."""
    return d.model_dump(exclude={"data_dir", "download"} | ({"loader"} if d.loader is None else set()))


# TrainConfig fields added after grids had cached models: left out of the keys while at their defaults, so
# that the keys (and cached models) of configs written before them stay the same
LATER_TRAINING_FIELDS = ("step_milestones", "step_factor")


def training_key_dump(t: Any) -> dict[str, Any]:
    """The recipe's settings as they enter cache keys and labels."""
    later = {f for f in LATER_TRAINING_FIELDS if getattr(t, f) == type(t).model_fields[f].default}
    return t.model_dump(exclude=later)


def model_key_dump(m: ModelConfig) -> dict[str, Any]:
    return m.model_dump(exclude={"feature_layer"} if m.feature_layer is None else set())


def grid_cells(cfg: ExperimentConfig) -> tuple[Cell, ...]:
    """Every (dataset, model, recipe, seed) of ``cfg``, with its labels and cache keys."""
    ds_dump = [dataset_key_dump(d) for d in cfg.dataset]
    m_dump = [model_key_dump(m) for m in cfg.model]
    t_dump = [training_key_dump(t) for t in cfg.training]
    ds_labels = variant_labels(ds_dump, None)
    m_labels = variant_labels([{"name": m.pop("name"), **m.pop("params"), **m} for m in map(dict, m_dump)], None)
    t_labels = variant_labels(t_dump, "train")
    data_keys = [digest({"v": CACHE_VERSION, "dataset": d}) for d in ds_dump]
    cells: list[Cell] = []
    for di, mi, ti in ((di, mi, ti) for di in range(len(ds_dump)) for mi in range(len(m_dump))
                       for ti in range(len(t_dump))):
        cost_key = digest({"data": data_keys[di], "model": m_dump[mi], "training": t_dump[ti]})
        prefix = tuple(([ds_labels[di]] if len(ds_dump) > 1 else []) + ([m_labels[mi]] if len(m_dump) > 1 else [])
                       + ([t_labels[ti]] if len(t_dump) > 1 else []))
        for seed in cfg.seeds:
            clean_key = digest({"stage": "clean", "data": data_keys[di], "model": m_dump[mi], "training": t_dump[ti],
                                "seed": seed})
            cells.append(Cell(len(cells), cfg.dataset[di], cfg.model[mi], cfg.training[ti], seed,
                              {"dataset": ds_labels[di], "model": m_labels[mi], "training": t_labels[ti]},
                              prefix, data_keys[di], clean_key, cost_key))
    return tuple(cells)


def variant_labels(variants: list[dict[str, Any]], base: str | None) -> list[str]:
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


def cell_units(cfg: ExperimentConfig, cell: Cell, attacks: Iterable[AttackVariant],
               defenses: Iterable[DefenseVariant]) -> list[Unit]:
    """The units of one cell: its clean model, then per attack its poisoned model and its defences."""

    def run(kind: str, key: str, attack: AttackVariant | None = None, defense: DefenseVariant | None = None,
            **keys: str) -> Run:
        labels = [attack.label if attack else "none", defense.label if defense else "none", f"s{cell.seed}"]
        return Run(run_id(cell.prefix + tuple(labels)), kind, cell, key, attack, defense, **keys)

    units = [Unit("clean", cell, (run("baseline", cell.clean_key),) if cfg.baseline else ())]
    for a in attacks:
        poison_key = digest({"stage": "poison", "data": cell.data_key, "attack": a.name, "params": a.params,
                             "seed": cell.seed, "clean": cell.clean_key if a.needs_clean_model else None})
        victim_key = digest({"stage": "victim", "poison": poison_key, "clean": cell.clean_key})
        keys = {"poison_key": poison_key, "victim_key": victim_key}
        units.append(Unit("attack", cell, (run("attack", victim_key, a, **keys),), a))
        defended = tuple(run("defense", defense_key(victim_key, d, cfg.clean_fraction), a, d, **keys)
                         for d in defenses if d.applies_to(a))
        if defended:
            units.append(Unit("defenses", cell, defended, a))
    return units


def defense_key(victim_key: str, defense: DefenseVariant, clean_fraction: float) -> str:
    return digest({"stage": "defense", "victim": victim_key, "defense": defense.name, "params": defense.params,
                   "clean_fraction": clean_fraction})


def _distinct_names(units: tuple[Unit, ...]) -> tuple[Unit, ...]:
    """``units`` with run names that differ as a case-insensitive file system (macOS, Windows) compares
    them: two different runs whose ids differ only in case, or in characters :func:`safe_name`
    replaced, each get a tail of their key; two entries that give the very same run are an error."""
    by_folded: dict[str, list[Run]] = {}
    for r in (r for u in units for r in u.runs):
        by_folded.setdefault(r.name.casefold(), []).append(r)
    clashes = [g for g in by_folded.values() if len(g) > 1]
    if not clashes:
        return units
    renamed: dict[int, Run] = {}
    for same in clashes:
        if len({r.key for r in same}) < len(same):
            from poisonlab.errors import ConfigError

            raise ConfigError(f"two entries of the config give the same run {same[0].name!r}; remove one "
                              "(or make their apply_to lists disjoint)")
        for r in same:
            renamed[id(r)] = replace(r, name=_bounded(f"{r.name}~{r.key[:8]}", r.name + r.key, MAX_NAME_CHARS))
    return tuple(replace(u, runs=tuple(renamed.get(id(r), r) for r in u.runs)) for u in units)


# ------------------------------------------------------------------ what is done
def load_result_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.json``; none when it is missing or unreadable (then everything runs).

    Only rows that are JSON objects with a string ``run`` and a string ``key`` are returned: the file
    may be from an older version, damaged, or edited by hand."""
    f = out / "results.json"
    if not f.is_file():
        return []
    try:
        rows = json.loads(f.read_text())
    except (ValueError, OSError):
        return []
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("run"), str) and isinstance(r.get("key"), str)]


@dataclass(frozen=True)
class Finished:
    """What a results folder already holds for a plan (see :func:`finished_runs`)."""

    done: frozenset[str]  # runs with a finished row of the same key
    failed: frozenset[str]  # runs whose row of the same key holds an error (they are retried)
    rows: dict[str, dict[str, Any]]  # run name -> its finished row, "run" set to the run's current name
    renamed: dict[str, str]  # run name -> the name its row (and runs/<name>.json) has in the folder, when they differ


def finished_runs(runs: dict[str, Run], out: Path) -> Finished:
    """What of ``runs`` the results folder ``out`` holds, recognised by each row's ``key``.

    The key is the digest of the run's full settings, so a row counts for the run with that key
    whatever its name: a folder written with another naming (poisonlab before readable ids, or a
    config that since gained a second model and so a prefix in every id) resumes. A row under a
    run's own name counts first; rows of other keys (another config, older settings) do not count.
    """
    by_key: dict[str, list[str]] = {}
    for name, r in runs.items():
        by_key.setdefault(r.key, []).append(name)
    rows = load_result_rows(out)
    matched: dict[str, dict[str, Any]] = {}
    exact = [r for r in rows if r["run"] in runs and runs[r["run"]].key == r["key"]]
    for row in exact:
        matched[row["run"]] = row
    for row in rows:  # rows of this folder's older names
        if row["run"] in matched and matched[row["run"]] is row:
            continue
        name = next((n for n in by_key.get(row["key"], ()) if n not in matched), None)
        if name is not None:
            matched[name] = row
    done = {n for n, r in matched.items() if not r.get("error")}
    return Finished(frozenset(done), frozenset(n for n in matched if n not in done),
                    {n: (r if r["run"] == n else dict(r, run=n)) for n, r in matched.items() if n in done},
                    {n: r["run"] for n, r in matched.items() if r["run"] != n})


def has_work(plan: Plan, unit: Unit) -> bool:
    """A unit has work when a run of it is unfinished; a clean unit also when an unfinished attack needs it."""
    if any(r.name not in plan.done for r in unit.runs):
        return True
    return unit.kind == "clean" and any(
        r.attack is not None and r.attack.needs_clean_model and r.name not in plan.done
        for r in plan.runs.values() if r.cell.index == unit.cell.index)


def unit_cache_status(plan: Plan, unit: Unit, cache: ArtifactCache, pending_clean: set[int]
                      ) -> tuple[int, int, dict[str, int]]:
    """``(trainings to do, trainings reused, cache entries found by stage)`` for one unit."""
    if unit.kind == "clean":
        has, pending = cache.has("clean", unit.cell.clean_key), unit.cell.index in pending_clean
        return int(pending and not has), int(pending and has), {"clean": int(has)}
    if unit.kind == "attack":
        run = unit.runs[0]
        has_victim = cache.has("victim", run.victim_key)
        found = {"poison": int(cache.has("poison", run.poison_key)), "victim": int(has_victim)}
        if run.name in plan.done:
            return 0, 0, found
        return int(not has_victim), int(has_victim), found
    todo = reused = found = resumable = 0
    for r in unit.runs:
        has = cache.has("defense", r.key)
        found += has
        resumable += not has and r.name not in plan.done and cache.path("progress", r.key).is_dir()
        if r.defense is not None and r.defense.retrains and r.name not in plan.done:
            reused, todo = reused + has, todo + (not has)
    return todo, reused, {"defense": found, "progress": resumable}


def with_cache_status(plan: Plan, cache: ArtifactCache, estimate: bool) -> Plan:
    """``plan`` with each unit's trainings, the cache counts and the time estimate filled in."""
    pending_clean = {u.cell.index for u in plan.units if u.kind == "clean" and has_work(plan, u)}
    counts = {"clean": 0, "poison": 0, "victim": 0, "defense": 0, "progress": 0}
    units, needed, reused = [], 0, 0
    per_cost: dict[str, int] = {}
    for u in plan.units:
        todo, again, found = unit_cache_status(plan, u, cache, pending_clean)
        units.append(replace(u, trainings=todo))
        needed, reused = needed + todo, reused + again
        for stage, n in found.items():
            counts[stage] += n
        if todo:
            per_cost[u.cell.cost_key] = per_cost.get(u.cell.cost_key, 0) + todo
    seconds, source = training_estimate(plan.cells, per_cost, cache, estimate)
    return replace(plan, units=tuple(units), cached=counts, trainings_needed=needed, trainings_reused=reused,
                   seconds_estimate=seconds, estimate_source=source)


def training_estimate(cells: Iterable[Cell], per_cost: dict[str, int], cache: ArtifactCache,
                      estimate: bool) -> tuple[float | None, str]:
    """Seconds of training for ``per_cost`` (trainings by cost key), from earlier trainings or timed steps."""
    if not per_cost:
        return 0.0, "nothing to train"
    total, measured, benched = 0.0, 0, 0
    cost_cells = {c.cost_key: c for c in cells}
    for ck, n in per_cost.items():
        s = cache.seconds(ck)
        if s is not None:
            measured += 1
        elif estimate:
            c = cost_cells[ck]
            s = bench_training_seconds(c.dataset, c.model, c.training)
            benched += s is not None
        if s is None:
            return None, ""
        total += s * n
    return total, ("from earlier trainings of the same settings" if not benched else
                   "from a few timed training steps on this machine" if not measured else
                   "earlier trainings and timed training steps")


# image shape and training-set size of the built-in datasets, so that planning reads no data
KNOWN_DATASETS = {"digits": ((8, 8, 1), 1437, 10), "mnist": ((28, 28, 1), 60000, 10),
                  "fashion_mnist": ((28, 28, 1), 60000, 10), "fashion-mnist": ((28, 28, 1), 60000, 10),
                  "cifar10": ((32, 32, 3), 50000, 10), "cifar-10": ((32, 32, 3), 50000, 10)}
_BENCH: dict[str, float | None] = {}


def bench_training_seconds(ds: DatasetConfig, model: ModelConfig, training: TrainConfig) -> float | None:
    """Rough seconds for one training: a few timed SGD steps on random images of the dataset's shape."""
    known = KNOWN_DATASETS.get(ds.name) if ds.loader is None else None
    if known is None:
        return None
    (h, w, c), n, k = known
    n = min(n, ds.train_size or n)
    key = json.dumps([h, w, c, k, model.model_dump(), training.batch_size, training.bf16, training.channels_last],
                     sort_keys=True, default=str)
    if key not in _BENCH:
        _BENCH[key] = _seconds_per_sample(model, (h, w, c), k, min(training.batch_size, 256), training)
    per_sample = _BENCH[key]
    return None if per_sample is None else per_sample * n * training.epochs * (1 - training.val_fraction) * 1.15


def _seconds_per_sample(model: ModelConfig, shape: tuple[int, int, int], k: int, bs: int,
                        training: TrainConfig) -> float | None:
    import numpy as np
    import torch

    from poisonlab.data import ImageSet
    from poisonlab.models import build_model_for
    from poisonlab.training.device import autocast, use_bf16

    h, w, c = shape
    try:
        images = np.random.default_rng(0).integers(0, 256, (k, h, w, c), dtype=np.uint8)
        shape_of = ImageSet(images, np.arange(k), [str(i) for i in range(k)])  # only its shape is used
        net = build_model_for(model.name, shape_of, feature_layer=model.feature_layer, **model.params)
        x, y = torch.rand(bs, c, h, w), torch.randint(0, k, (bs,))
        # the precision and memory layout the training will use: a float32 step on 32x32 images costs
        # 2-3x a bf16 one, and timing it overstated a CIFAR-10 grid threefold
        bf16 = use_bf16(training.bf16, "cpu", w)
        if training.channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        net.train()
        times = []
        # forward + backward dominate a step; torch.optim is left out because its first use imports
        # torch._dynamo, which costs more than the whole estimate
        # the first steps build oneDNN's kernels (under bf16 several steps, each slower than the training's
        # steady state): step until two in a row agree within 25%, at most 8 steps
        while len(times) < 8:
            t0 = time.perf_counter()
            net.zero_grad(set_to_none=True)
            with autocast(bf16, "cpu"):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            times.append(time.perf_counter() - t0)
            if len(times) >= 3 and max(times[-2:]) <= 1.25 * min(times[-2:]):
                break
        return min(times[-2:]) / bs
    except Exception:  # noqa: BLE001 - an estimate must never stop a grid
        return None
