"""Executing the units of a :class:`~poisonlab.experiments.plan.Plan`: the stages, cached.

A :class:`Workspace` lives in one process (the driver for the local
executor, each Ray worker otherwise). Every stage is "look in the cache,
else compute and store", and returns a small named result:

- :meth:`Workspace.clean` -> :class:`Trained` (the baseline's metrics, history, seconds);
- :meth:`Workspace.poison` -> :class:`Poisoned` (the poisoned set, stored as its
  difference from the clean set, and the record);
- :meth:`Workspace.victim` -> :class:`Victim` (the poisoned model, trained once per
  poisoned set, and its evaluation);
- :meth:`Workspace.defend` -> :class:`Defended` (a defence's evaluation, detection
  metrics, kept mask and scores); arrays that defences leave in
  ``DefenseContext.cache`` (features, cross-validated probabilities) are stored
  as the ``features`` stage, so the next defence of the same poisoned model,
  in any process, finds them.

Rows, run JSON and plots are written by :class:`~poisonlab.experiments.outputs.RunWriter`
from those results, so a run whose stages are all cached costs a few milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from poisonlab.data import ImageSet, Splits, load_data
from poisonlab.experiments.cache import ArtifactCache, jsonable, poisoning_from_entry, poisoning_to_entry
from poisonlab.experiments.config import DatasetConfig
from poisonlab.experiments.outputs import RunWriter
from poisonlab.experiments.plan import Cell, Plan, Run, Unit
from poisonlab.training.device import resolve_device
from poisonlab.utils import seed_everything

PCA_POINTS = 1000


# ------------------------------------------------------------------ named results
@dataclass(frozen=True)
class Trained:
    """A model's evaluation after training: test metrics, per-epoch history, training seconds."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class Poisoned:
    """An attack's output: the poisoned training set, its record and stealth figures."""

    train: ImageSet
    record: Any  # poisonlab.attacks.Poisoning
    stealth: dict[str, Any]


@dataclass(frozen=True)
class Victim:
    """The model trained on a poisoned set, with its evaluation and a 2-D view of its features."""

    model: Any
    poisoned: Poisoned
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    poison_seconds: float
    kind: str | None  # "full", or "frozen_features" (only the head retrained, Poison Frogs' transfer setting)
    stealth: dict[str, Any] | None
    poisoning: dict[str, Any]  # the record's summary, as JSON
    view: dict[str, np.ndarray]  # pca_idx, pca_xy: PCA of the features of a sample of the training set

    @property
    def frozen(self) -> bool:
        return self.kind == "frozen_features"


@dataclass(frozen=True)
class Defended:
    """A defence's result: evaluation of the model it returned, its own metrics, its arrays."""

    metrics: dict[str, Any]
    defense_metrics: dict[str, Any]
    seconds: float
    # kept, scores, after_idx, after_xy (each when the defence has it), and the defence's own
    # DefenseResult.arrays (nc_mask, strip_ent_clean, ...; absent from caches written before them)
    arrays: dict[str, np.ndarray]


def dataset_splits(d: DatasetConfig, data_dir: str | None = None) -> Splits:
    """The configured dataset's splits (``data_dir`` overrides the config's)."""
    return load_data(**(d.model_dump() | {"data_dir": data_dir or d.data_dir}))


class Workspace:
    """Runs units of one plan in this process, reading and filling the shared cache.

    Args:
        plan: the plan whose units run here.
        out: the results directory (rows and files are written by a :class:`RunWriter` on it).
        cache: the artifact cache shared by every process of the grid.
        data_dir: where datasets live (overrides the config's ``data_dir``).
        progress: show the training loop's progress bars.
        status: ``status(unit_name, text)`` is told what a unit is doing (progress display).
        preloaded: datasets already loaded, by data key.
    """

    def __init__(self, plan: Plan, out: str | Path, cache: ArtifactCache, data_dir: str | None = None,
                 progress: bool = False, status: Callable[[str, str], None] | None = None,
                 preloaded: dict[str, Splits] | None = None):
        self.plan, self.cfg, self.cache = plan, plan.cfg, cache
        self.writer = RunWriter(out, plan.cfg.plots)
        self.data_dir, self.progress = data_dir, progress
        self.status = status or (lambda unit, text: None)
        self._data: dict[str, Splits] = dict(preloaded or {})
        self._models: dict[tuple[str, str], Any] = {}

    # ----------------------------------------------------------- helpers
    def data(self, cell: Cell) -> Splits:
        if cell.data_key not in self._data:
            self._data[cell.data_key] = dataset_splits(cell.dataset, self.data_dir)
        return self._data[cell.data_key]

    def new_model(self, cell: Cell) -> Any:
        from poisonlab.models import build_model_for

        m = cell.model
        model = build_model_for(m.name, self.data(cell).train, feature_layer=m.feature_layer, **m.params)
        # "auto": a GPU when the worker has one (Ray: --gpus-per-run)
        return model.to(resolve_device(self.cfg.device))

    def trainer(self, cell: Cell, frozen: bool = False) -> Callable[..., Any]:
        """``train_model(imageset, sample_weight=None, **recipe_overrides) -> model`` for this cell.

        With ``frozen`` (feature-collision victims) every training starts from the
        clean model's weights and only the head learns: ``fit(..., freeze_body=True)``.
        """
        import poisonlab.training.loop as loop

        recipe0 = cell.training

        def train_model(train: ImageSet, sample_weight: np.ndarray | None = None, description: str = "train",
                        history_out: list | None = None, batch_weight_fn: Any = None, **overrides: Any):
            recipe = loop.TrainConfig.model_validate(recipe0.model_dump() | overrides) if overrides else recipe0
            seed_everything(cell.seed)
            model = self.new_model(cell)
            if frozen:
                model.load_state_dict(self.clean_model(cell).state_dict())
            # looked up on the module at call time, so that tests can count trainings
            hist = loop.fit(model, train, recipe, sample_weight=sample_weight, seed=cell.seed,
                            progress=self.progress, description=description, freeze_body=frozen,
                            batch_weight_fn=batch_weight_fn)
            if history_out is not None:
                history_out.extend(hist)
            return model

        return train_model

    def _train_and_evaluate(self, cell: Cell, train: ImageSet, record: Any, description: str,
                            frozen: bool = False) -> tuple[Any, Trained]:
        from poisonlab.metrics import evaluate

        hist: list[dict] = []
        t0 = time.perf_counter()
        model = self.trainer(cell, frozen=frozen)(train, description=description, history_out=hist)
        secs = time.perf_counter() - t0
        return model, Trained(evaluate(model, self.data(cell).test, record, tta=cell.training.tta),
                              hist, secs)

    def _load_model(self, stage: str, key: str, cell: Cell) -> Any:
        if (stage, key) not in self._models:
            model = self.new_model(cell)
            model.load_state_dict(self.cache.state_dict(stage, key))
            model.eval()
            if len(self._models) > 8:
                self._models.pop(next(iter(self._models)))
            self._models[(stage, key)] = model
        return self._models[(stage, key)]

    def baseline_metrics(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's clean model's test metrics, if it has been trained (for the d_* columns)."""
        return self.cache.meta("clean", cell.clean_key)["metrics"] if self.cache.has("clean", cell.clean_key) else None

    # ------------------------------------------------------------ stages
    def clean_model(self, cell: Cell) -> Any:
        self.clean(cell)
        return self._load_model("clean", cell.clean_key, cell)

    def clean(self, cell: Cell) -> Trained:
        """The cell's clean baseline, trained once."""
        if not self.cache.has("clean", cell.clean_key):
            model, res = self._train_and_evaluate(cell, self.data(cell).train, None, f"clean s{cell.seed}")
            self.cache.put("clean", cell.clean_key, {"history": res.history, "metrics": res.metrics,
                                                     "seconds": res.seconds}, model=model)
            self.cache.record_seconds(cell.cost_key, res.seconds)
            self._models[("clean", cell.clean_key)] = model
        meta = self.cache.meta("clean", cell.clean_key)
        return Trained(meta["metrics"], meta["history"], meta["seconds"])

    def poison(self, run: Run) -> Poisoned:
        """The attack's poisoned set of ``run``'s cell, computed once (unless its trigger cannot be stored)."""
        from poisonlab.attacks import AttackContext

        cell, data = run.cell, self.data(run.cell)
        if self.cache.has("poison", run.poison_key):
            meta = self.cache.meta("poison", run.poison_key)
            poisoned, record = poisoning_from_entry(data.train, meta, self.cache.arrays("poison", run.poison_key))
            return Poisoned(poisoned, record, meta.get("stealth") or {})
        attack = run.attack.build()
        attack.check(data.train)
        ctx = AttackContext(test=data.test, clean_model=self.clean_model(cell) if attack.needs_clean_model else None,
                            train_fn=self.trainer(cell), progress=self.progress)
        poisoned, record = attack.poison(data.train, seed=cell.seed, context=ctx)
        stealth = compute_stealth(data.train, poisoned, record)
        entry = poisoning_to_entry(data.train.images, data.train.labels, poisoned, record)
        if entry is not None:  # else a trigger we cannot store safely: recomputed next time rather than pickled
            meta, arrays = entry
            self.cache.put("poison", run.poison_key, meta | {"stealth": stealth}, arrays)
        return Poisoned(poisoned, record, stealth)

    def victim(self, run: Run) -> Victim:
        """The model trained on ``run``'s poisoned set (once per poisoned set), with its evaluation."""
        cell, key = run.cell, run.victim_key
        poisoned = self.poison(run)
        if not self.cache.has("victim", key):
            record = poisoned.record
            frozen = record.extra.get("victim") == "frozen_features"
            model, res = self._train_and_evaluate(cell, poisoned.train, record, f"{run.attack.name} s{cell.seed}",
                                                  frozen)
            view = feature_view(model, poisoned.train, record, cell.seed)
            meta = {"history": res.history, "metrics": res.metrics, "seconds": res.seconds,
                    "victim": "frozen_features" if frozen else "full", "poison_seconds": record.seconds,
                    "stealth": poisoned.stealth, "poisoning": jsonable(record.summary())}
            self.cache.put("victim", key, meta, view, model=model)
            self._models[("victim", key)] = model
            if not frozen:
                self.cache.record_seconds(cell.cost_key, res.seconds)
        meta = self.cache.meta("victim", key)
        return Victim(self._load_model("victim", key, cell), poisoned, meta["metrics"], meta["history"],
                      meta["seconds"], meta["poison_seconds"], meta.get("victim"), meta.get("stealth"),
                      meta["poisoning"], self.cache.arrays("victim", key))

    def trusted_set(self, cell: Cell, victim: Victim) -> ImageSet:
        """The defender's small clean set: ``clean_fraction`` of the training set, none of it poisoned.

        An attack may leave few or no clean samples (class-wise noise touches every image): then the
        trusted set is what there is, and only the defences that need one refuse, with their own error.
        """
        train = self.data(cell).train
        clean_idx = np.setdiff1d(np.arange(len(train)), victim.poisoned.record.indices)
        n = min(len(clean_idx), max(train.num_classes, int(self.cfg.clean_fraction * len(train))))
        return train.subset(clean_idx).stratified_subset(n, seed=cell.seed) if n else train.subset(clean_idx)

    def defend(self, run: Run, victim: Victim, trusted: ImageSet, shared: dict[str, Any]) -> Defended:
        """``run``'s defence applied to ``victim``, computed once; ``shared`` is the defences' common cache."""
        if not self.cache.has("defense", run.key):
            self._compute_defense(run, victim, trusted, shared)
        meta = self.cache.meta("defense", run.key)
        return Defended(meta["metrics"], meta["defense_metrics"], meta["seconds"],
                        self.cache.arrays("defense", run.key))

    def _compute_defense(self, run: Run, victim: Victim, trusted: ImageSet, shared: dict[str, Any]) -> None:
        from poisonlab.defenses import DefenseContext
        from poisonlab.metrics import evaluate

        cell, data, record = run.cell, self.data(run.cell), victim.poisoned.record
        ctx = DefenseContext(train=victim.poisoned.train, model=victim.model, test=data.test,
                             train_model=self.trainer(cell, frozen=victim.frozen), clean_set=trusted,
                             poisoning=record, seed=cell.seed, cache=shared, progress=self.progress,
                             progress_dir=self.cache.progress_dir(run.key))
        t0 = time.perf_counter()
        result = run.defense.build().run(ctx)
        seconds = time.perf_counter() - t0 if result.seconds is None else float(result.seconds)
        metrics = evaluate(result.model, data.test, record, tta=cell.training.tta)
        arrays: dict[str, np.ndarray] = {}
        for name, a in result.arrays.items():
            if name in ("kept", "scores") or name.startswith("after_"):  # the runner's own names below
                raise ValueError(f"defence {run.defense.label}: DefenseResult.arrays may not use the name "
                                 f"{name!r} (reserved: kept, scores, after_*)")
            a = np.asarray(a)
            if a.dtype.kind not in "biuf":  # the cache stores npz read without pickle
                raise ValueError(f"defence {run.defense.label}: DefenseResult.arrays[{name!r}] has dtype {a.dtype}; "
                                 "only bool, integer and float arrays are cached")
            arrays[name] = a
        if result.kept is not None:
            arrays["kept"] = np.asarray(result.kept, dtype=bool)
        if result.scores is not None:
            arrays["scores"] = np.asarray(result.scores, dtype=np.float64)
        if result.model is not victim.model:
            arrays.update(feature_view(result.model, victim.poisoned.train, record, cell.seed, result.kept,
                                       prefix="after"))
        self.cache.put("defense", run.key, {"metrics": metrics, "defense_metrics": jsonable(result.metrics),
                                            "seconds": seconds}, arrays)
        self.cache.drop_progress(run.key)

    def _share_features(self, victim_key: str, shared: dict[str, Any], known: set[str]) -> None:
        """Store arrays a defence left in the shared context cache, for the next defence in any process."""
        new = {k for k, v in shared.items() if k not in known and isinstance(v, np.ndarray) and v.dtype != object}
        if new:
            known |= new
            self.cache.put("features", victim_key, {"keys": sorted(known)},
                           {k: v for k, v in shared.items() if k in known and isinstance(v, np.ndarray)})

    # ------------------------------------------------------------- units
    def run_unit(self, unit: Unit, emit: Callable[[list[dict[str, Any]]], None] | None = None
                 ) -> list[dict[str, Any]]:
        """Run every unfinished run of ``unit``; a failure becomes a row with ``error``, never an exception.

        ``emit`` receives each defence's row as soon as it is done (a victim's defences can take hours
        together: a run stopped between two of them keeps the finished ones' rows); every row is returned.
        """
        pending = [r for r in unit.runs if r.name not in self.plan.done]
        cell = unit.cell
        try:
            if unit.kind == "clean":
                self.status(unit.name, f"training clean model ({cell.labels['model']}, seed {cell.seed})")
                clean = self.clean(cell)
                return [self.writer.baseline(r, clean, self.data(cell).train.classes) for r in pending]
            if unit.kind == "attack":
                self.status(unit.name, f"{unit.attack.label}: poisoning and training")
                return [self.writer.attack(r, self.victim(r), self.data(cell).train, self.baseline_metrics(cell))
                        for r in pending]
            return self._defense_rows(unit, pending, emit)
        except Exception as e:  # noqa: BLE001 - recorded per run, the grid goes on
            return [self.writer.failed(r, e) for r in pending]

    def _defense_rows(self, unit: Unit, pending: list[Run],
                      emit: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        cell = unit.cell
        victim = self.victim(pending[0]) if pending else None
        if victim is None:
            return []
        trusted = self.trusted_set(cell, victim)
        victim_key = pending[0].victim_key
        shared: dict[str, Any] = dict(self.cache.arrays("features", victim_key))
        known = set(shared)
        rows = []
        for run in pending:
            self.status(unit.name, f"{unit.attack.label}: defence {run.defense.label}")
            try:
                defended = self.defend(run, victim, trusted, shared)
                self._share_features(victim_key, shared, known)
                row = self.writer.defense(run, victim, defended, self.baseline_metrics(cell),
                                          self.data(cell).train.classes)
            except Exception as e:  # noqa: BLE001
                row = self.writer.failed(run, e)
            rows.append(row)
            if emit is not None:
                emit([row])
        return rows


# ------------------------------------------------------------------ views and stealth
def pca_2d(features: np.ndarray) -> np.ndarray:
    """First two principal components of ``features`` (N, D) -> (N, 2)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros_like(comps)])
    return (x @ comps.T).astype(np.float32)


def pca_sample(n: int, poison_idx: np.ndarray, seed: int) -> np.ndarray:
    """Up to PCA_POINTS training indices for the feature views, with (up to 300 of) the poisoned ones in."""
    rng = np.random.default_rng(seed)
    p = np.asarray(poison_idx, dtype=np.int64)
    if len(p) > 300:
        p = rng.choice(p, 300, replace=False)
    rest = np.setdiff1d(np.arange(n), p)
    k = min(len(rest), max(0, PCA_POINTS - len(p)))
    return np.sort(np.concatenate([p, rng.choice(rest, k, replace=False)])).astype(np.int64)


def feature_view(model: Any, poisoned: ImageSet, record: Any, seed: int, kept: np.ndarray | None = None,
                 prefix: str = "pca") -> dict[str, np.ndarray]:
    """``{prefix}_idx`` and ``{prefix}_xy``: 2-D PCA of ``model``'s features on a sample of ``poisoned``
    (restricted to the ``kept`` samples when given); empty when the model gives no features."""
    try:
        from poisonlab.training.loop import extract_features

        idx = pca_sample(len(poisoned), record.indices, seed)
        if kept is not None:
            idx = idx[np.asarray(kept, dtype=bool)[idx]]
        if len(idx) < 2:
            return {}
        return {f"{prefix}_idx": idx, f"{prefix}_xy": pca_2d(extract_features(model, poisoned.subset(idx)))}
    except Exception:  # noqa: BLE001 - a model without features (a wrapper, a plain module): no view
        return {}


def compute_stealth(train: ImageSet, poisoned: ImageSet, record: Any) -> dict[str, Any]:
    """Stealth figures of a poisoning (see :func:`poisonlab.attacks.stealth.stealth_metrics`); {} if not comparable."""
    from poisonlab.attacks.stealth import stealth_metrics

    if len(poisoned) != len(train) or poisoned.images.shape != train.images.shape:
        return {}
    try:
        return jsonable(stealth_metrics(train.images, poisoned.images, train.labels, poisoned.labels, record.indices))
    except Exception as e:  # noqa: BLE001 - stealth figures are extra information, never fatal
        return {"stealth_error": f"{type(e).__name__}: {e}"}
