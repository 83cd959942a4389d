"""Executing the units of a :class:`~poisonlab.experiments.plan.Plan`: the stages, cached.

A :class:`Workspace` lives in one process (the driver for the local
executor, each Ray worker otherwise). Every stage is "look in the cache,
else compute and store": ``clean`` (baseline weights, history, metrics),
``poison`` (the poisoned set as its difference from the clean set, and the
record), ``victim`` (the poisoned model), ``features`` (arrays defences put
in ``DefenseContext.cache``: features, cross-validated probabilities) and
``defense`` (evaluation, detection metrics, kept mask and scores). A run's
row, JSON and plots are written from those entries, so a run whose stages
are all cached costs a few milliseconds.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from poisonlab.data import ImageSet, load_dataset
from poisonlab.experiments.cache import ArtifactCache, jsonable, poisoning_from_entry, poisoning_to_entry
from poisonlab.experiments.config import DatasetConfig
from poisonlab.experiments.plan import Cell, Plan, RunSpec, Unit
from poisonlab.utils import atomic_write_json, default_device, seed_everything

ROW_METRICS = ("clean_acc", "macro_f1", "asr", "robust_acc", "target_success")
STEALTH_KEYS = ("linf", "l2", "psnr", "ssim", "label_change_rate")
PCA_POINTS = 1000


@dataclass
class Data:
    train: ImageSet
    test: ImageSet


def load_data(d: DatasetConfig, data_dir: str | None = None) -> Data:
    """Load the configured dataset splits (with the configured stratified subsets)."""
    kw = dict(data_dir=data_dir or d.data_dir, download=d.download, path=d.path, image_size=d.image_size)
    train = load_dataset(d.name, "train", **kw)
    if d.name == "folder":  # one folder: hold out a stratified test split
        train, test, _, _ = train.split(0.2, seed=0)
    else:
        test = load_dataset(d.name, "test", **kw)
    if d.train_size and d.train_size < len(train):
        train = train.stratified_subset(d.train_size, seed=0)
    if d.test_size and d.test_size < len(test):
        test = test.stratified_subset(d.test_size, seed=0)
    return Data(train, test)


def channel_stats(train: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``train`` (see :meth:`ImageSet.channel_stats`)."""
    return train.channel_stats()


def row_metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ROW_METRICS if k in m}


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


class Workspace:
    """Runs units of one plan in this process, reading and filling the shared cache."""

    def __init__(self, plan: Plan, out: str | Path, cache: ArtifactCache, data_dir: str | None = None,
                 progress: bool = False, status: Callable[[str, str], None] | None = None):
        self.plan, self.cfg, self.out, self.cache = plan, plan.cfg, Path(out), cache
        self.data_dir, self.progress = data_dir, progress
        self.status = status or (lambda unit, text: None)
        self._data: dict[str, Data] = {}
        self._models: dict[tuple[str, str], Any] = {}

    # ----------------------------------------------------------- helpers
    def data(self, cell: Cell) -> Data:
        if cell.data_key not in self._data:
            self._data[cell.data_key] = load_data(self.cfg.dataset[cell.dataset], self.data_dir)
        return self._data[cell.data_key]

    def new_model(self, cell: Cell):
        from poisonlab.models import build_model

        data = self.data(cell)
        h, _, c = data.train.shape
        mean, std = channel_stats(data.train)
        m = self.cfg.model[cell.model]
        model = build_model(m.name, c, data.train.num_classes, h, mean=mean, std=std, **m.params)
        return model.to(default_device())  # a GPU when the worker has one (Ray: --gpus-per-run)

    def trainer(self, cell: Cell, frozen: bool = False) -> Callable[..., Any]:
        """``train_model(imageset, sample_weight=None, **recipe_overrides) -> model`` for this cell.

        With ``frozen`` (feature-collision victims) every training starts from the
        clean model's weights and only the head learns: ``fit(..., freeze_body=True)``.
        """
        import poisonlab.training.loop as loop

        recipe0 = self.cfg.training[cell.training]

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

    def _load_model(self, stage: str, key: str, cell: Cell):
        if (stage, key) not in self._models:
            model = self.new_model(cell)
            model.load_state_dict(self.cache.state_dict(stage, key))
            model.eval()
            if len(self._models) > 8:
                self._models.pop(next(iter(self._models)))
            self._models[(stage, key)] = model
        return self._models[(stage, key)]

    # ------------------------------------------------------------ stages
    def clean_model(self, cell: Cell):
        self.ensure_clean(cell)
        return self._load_model("clean", cell.clean_key, cell)

    def ensure_clean(self, cell: Cell) -> dict[str, Any]:
        from poisonlab.metrics import evaluate

        if not self.cache.has("clean", cell.clean_key):
            data = self.data(cell)
            hist: list[dict] = []
            t0 = time.perf_counter()
            model = self.trainer(cell)(data.train, description=f"clean s{cell.seed}", history_out=hist)
            secs = time.perf_counter() - t0
            m = evaluate(model, data.test, tta_flip=self.cfg.training[cell.training].tta_flip)
            self.cache.put("clean", cell.clean_key, {"history": hist, "metrics": m, "seconds": secs}, model=model)
            self.cache.record_seconds(cell.cost_key, secs)
            self._models[("clean", cell.clean_key)] = model
        return self.cache.meta("clean", cell.clean_key)

    def ensure_poison(self, cell: Cell, ai: int) -> tuple[ImageSet, Any, dict[str, Any]]:
        from poisonlab.attacks import AttackContext, get_attack

        poison_key, _ = self.plan.attack_keys[(cell.index, ai)]
        data = self.data(cell)
        if self.cache.has("poison", poison_key):
            meta = self.cache.meta("poison", poison_key)
            poisoned, record = poisoning_from_entry(data.train, meta, self.cache.arrays("poison", poison_key))
            return poisoned, record, meta
        mcfg = self.cfg.attacks[ai]
        attack = get_attack(mcfg.name, **mcfg.params)
        attack.check(data.train)
        ctx = AttackContext(test=data.test, clean_model=self.clean_model(cell) if attack.needs_clean_model else None,
                            train_fn=self.trainer(cell), progress=self.progress)
        poisoned, record = attack.poison(data.train, seed=cell.seed, context=ctx)
        stealth = compute_stealth(data.train, poisoned, record)
        entry = poisoning_to_entry(data.train.images, data.train.labels, poisoned, record)
        if entry is None:  # a trigger we cannot store safely: recompute next time rather than pickle
            meta = {"seconds": record.seconds, "stealth": stealth, "uncached": True}
        else:
            meta, arrays = entry
            meta["stealth"] = stealth
            self.cache.put("poison", poison_key, meta, arrays)
        return poisoned, record, meta

    def ensure_victim(self, cell: Cell, ai: int) -> tuple[Any, ImageSet, Any, dict[str, Any]]:
        """The poisoned model (trained once per poisoned set), the poisoned set, its record, and the meta."""
        from poisonlab.metrics import evaluate

        _, victim_key = self.plan.attack_keys[(cell.index, ai)]
        poisoned, record, pmeta = self.ensure_poison(cell, ai)
        if not self.cache.has("victim", victim_key):
            data = self.data(cell)
            frozen = record.extra.get("victim") == "frozen_features"
            hist: list[dict] = []
            t0 = time.perf_counter()
            model = self.trainer(cell, frozen=frozen)(
                poisoned, description=f"{self.cfg.attacks[ai].name} s{cell.seed}", history_out=hist)
            secs = time.perf_counter() - t0
            m = evaluate(model, data.test, record, tta_flip=self.cfg.training[cell.training].tta_flip)
            arrays = {}
            try:
                from poisonlab.training.loop import extract_features

                idx = pca_sample(len(poisoned), record.indices, cell.seed)
                arrays = {"pca_idx": idx, "pca_xy": pca_2d(extract_features(model, poisoned.subset(idx)))}
            except Exception:  # a model without features(): no feature view, the run still counts
                pass
            meta = {"history": hist, "metrics": m, "seconds": secs, "victim": "frozen_features" if frozen else "full",
                    "poison_seconds": record.seconds, "stealth": pmeta.get("stealth") or {},
                    "poisoning": jsonable(record.summary())}
            self.cache.put("victim", victim_key, meta, arrays, model=model)
            self._models[("victim", victim_key)] = model
            if not frozen:
                self.cache.record_seconds(cell.cost_key, secs)
        meta = self.cache.meta("victim", victim_key)
        return self._load_model("victim", victim_key, cell), poisoned, record, meta

    # ------------------------------------------------------------- units
    def run_unit(self, unit: Unit) -> list[dict[str, Any]]:
        """Run every unfinished run of ``unit``; a failure becomes a row with ``error``, never an exception."""
        cell = self.plan.cells[unit.cell]
        pending = [r for r in unit.runs if r not in self.plan.done]
        try:
            if unit.kind == "clean":
                self.status(unit.name, f"training clean model ({cell.labels['model']}, seed {cell.seed})")
                meta = self.ensure_clean(cell)
                return [self._baseline_row(cell, self.plan.runs[r], meta) for r in pending]
            if unit.kind == "attack":
                self.status(unit.name, f"{self.plan.attack_info[unit.attack]['label']}: poisoning and training")
                return [self._attack_row(cell, unit.attack, self.plan.runs[r]) for r in pending]
            return self._defense_rows(cell, unit, pending)
        except Exception as e:  # noqa: BLE001 - recorded per run, the grid goes on
            return [self._failed(self.plan.runs[r], e) for r in pending]

    def _base_row(self, spec: RunSpec, cell: Cell) -> dict[str, Any]:
        return {"run": spec.run, "dataset": cell.labels["dataset"], "model": cell.labels["model"],
                "training": cell.labels["training"], "attack": spec.attack_label, "defense": spec.defense_label,
                "seed": cell.seed, "key": spec.key}

    def _failed(self, spec: RunSpec, e: BaseException) -> dict[str, Any]:
        cell = self.plan.cells[spec.cell]
        row = self._base_row(spec, cell) | {"error": f"{type(e).__name__}: {e}"}
        atomic_write_json(self.out / "runs" / f"{spec.run}.json",
                          {"row": row, "traceback": traceback.format_exception(e)})
        return row

    def _deltas(self, cell: Cell, m: dict[str, Any]) -> dict[str, Any]:
        if not self.cache.has("clean", cell.clean_key):
            return {}
        base = self.cache.meta("clean", cell.clean_key)["metrics"]
        return {f"d_{k}": m[k] - base[k] for k in ("clean_acc", "macro_f1") if k in m and k in base}

    def _write_run(self, spec: RunSpec, row: dict[str, Any], detail: dict[str, Any]) -> None:
        atomic_write_json(self.out / "runs" / f"{spec.run}.json", {"row": row, **detail})

    def _baseline_row(self, cell: Cell, spec: RunSpec, meta: dict[str, Any]) -> dict[str, Any]:
        m = meta["metrics"]
        row = self._base_row(spec, cell) | row_metrics(m) | {"n_poisoned": 0, "train_seconds": meta["seconds"]}
        files = self._common_plots(spec.run, meta.get("history"), m, self.data(cell).train.classes) if self.cfg.plots else {}
        self._write_run(spec, row, {"metrics": m, "history": meta["history"], "plots": files})
        return row

    def _attack_row(self, cell: Cell, ai: int, spec: RunSpec) -> dict[str, Any]:
        from poisonlab.report import plots as P

        model, poisoned, record, meta = self.ensure_victim(cell, ai)
        m = meta["metrics"]
        row = (self._base_row(spec, cell) | {"n_poisoned": len(record.indices), "poison_seconds": meta["poison_seconds"],
                                             "train_seconds": meta["seconds"]}
               | row_metrics(m) | self._deltas(cell, m) | _stealth_cols(meta.get("stealth")))
        files: dict[str, str] = {}
        if self.cfg.plots:
            data = self.data(cell)
            files = self._common_plots(spec.run, meta.get("history"), m, data.train.classes)
            idx = record.indices[:8]
            if len(idx) and len(poisoned) == len(data.train):
                names = data.train.classes
                files["examples"] = self._rel(P.plot_examples(
                    data.train.images[idx], poisoned.images[idx], self.out / "plots" / f"{spec.run}_examples.png",
                    [names[i] for i in data.train.labels[idx]], [names[i] for i in poisoned.labels[idx]],
                    title=f"{record.attack}: clean vs poisoned"))
            arr = self.cache.arrays("victim", spec.key)
            if "pca_xy" in arr:
                mask = record.poison_mask(len(poisoned))[arr["pca_idx"]]
                files["features"] = self._rel(P.plot_feature_views(
                    [("poisoned model, all training samples", arr["pca_xy"], mask)],
                    self.out / "plots" / f"{spec.run}_features.png", f"{spec.run}: penultimate features (PCA)"))
        self._write_run(spec, row, {"metrics": m, "history": meta["history"], "poisoning": meta["poisoning"],
                                    "stealth": meta.get("stealth"), "victim": meta.get("victim"), "plots": files})
        return row

    def _defense_rows(self, cell: Cell, unit: Unit, pending: list[str]) -> list[dict[str, Any]]:
        from poisonlab.defenses import DefenseContext, get_defense
        from poisonlab.metrics import evaluate

        ai = unit.attack
        _, victim_key = self.plan.attack_keys[(cell.index, ai)]
        attack_spec = next(r for r in self.plan.runs.values()
                           if r.kind == "attack" and r.cell == cell.index and r.attack == ai)
        model, poisoned, record, vmeta = self.ensure_victim(cell, ai)
        data = self.data(cell)
        vm = vmeta["metrics"]
        base = (self._base_row(attack_spec, cell) | {"n_poisoned": len(record.indices),
                                                     "poison_seconds": vmeta["poison_seconds"],
                                                     "train_seconds": vmeta["seconds"]}
                | _stealth_cols(vmeta.get("stealth")))
        clean_idx = np.setdiff1d(np.arange(len(data.train)), record.indices)
        # an attack may leave few or no clean samples (class-wise noise touches every image): then the
        # trusted set is what there is, and only the defences that need one refuse, with their own error
        n_trusted = min(len(clean_idx), max(data.train.num_classes, int(self.cfg.clean_fraction * len(data.train))))
        trusted = (data.train.subset(clean_idx).stratified_subset(n_trusted, seed=cell.seed) if n_trusted
                   else data.train.subset(clean_idx))
        shared: dict[str, Any] = dict(self.cache.arrays("features", victim_key))
        known = set(shared)
        frozen = vmeta.get("victim") == "frozen_features"
        rows = []
        for dj, run in zip(unit.defenses, unit.runs):
            if run not in pending:
                continue
            spec = self.plan.runs[run]
            dcfg = self.cfg.defenses[dj]
            self.status(unit.name, f"{attack_spec.attack_label}: defence {dcfg.label}")
            try:
                if not self.cache.has("defense", spec.key):
                    defense = get_defense(dcfg.name, **dcfg.params)
                    if not dcfg.retrain:
                        defense.retrain = False
                    dctx = DefenseContext(train=poisoned, model=model, test=data.test,
                                          train_model=self.trainer(cell, frozen=frozen), clean_set=trusted,
                                          poisoning=record, seed=cell.seed, cache=shared, progress=self.progress)
                    t0 = time.perf_counter()
                    result = defense.run(dctx)
                    dsecs = time.perf_counter() - t0
                    dm = evaluate(result.model, data.test, record, tta_flip=self.cfg.training[cell.training].tta_flip)
                    arrays: dict[str, np.ndarray] = {}
                    if result.kept is not None:
                        arrays["kept"] = np.asarray(result.kept, dtype=bool)
                    if result.scores is not None:
                        arrays["scores"] = np.asarray(result.scores, dtype=np.float64)
                    if result.model is not model:
                        arrays.update(_after_view(result.model, poisoned, record, cell.seed, result.kept))
                    self.cache.put("defense", spec.key, {
                        "metrics": dm, "defense_metrics": jsonable(result.metrics), "seconds": dsecs}, arrays)
                    new = {k: v for k, v in shared.items() if k not in known and isinstance(v, np.ndarray)
                           and v.dtype != object}
                    if new:  # features / cross-validated predictions for the next defence, in any process
                        known |= set(new)
                        self.cache.put("features", victim_key, {"keys": sorted(known)},
                                       {k: v for k, v in shared.items() if k in known and isinstance(v, np.ndarray)})
                rows.append(self._defense_row(cell, spec, base, vm, record, poisoned))
            except Exception as e:  # noqa: BLE001
                rows.append(self._failed(spec, e))
        return rows

    def _defense_row(self, cell: Cell, spec: RunSpec, base: dict[str, Any], vm: dict[str, Any], record: Any,
                     poisoned: ImageSet) -> dict[str, Any]:
        from poisonlab.metrics import defense_effectiveness_rating
        from poisonlab.report import plots as P

        meta = self.cache.meta("defense", spec.key)
        arr = self.cache.arrays("defense", spec.key)
        dm, dmet = meta["metrics"], meta["defense_metrics"]
        row = (base | {"run": spec.run, "key": spec.key, "defense": spec.defense_label, "defense_seconds": meta["seconds"]}
               | row_metrics(dm) | self._deltas(cell, dm)
               | {k: v for k, v in dmet.items() if isinstance(v, (int, float, str, bool)) or v is None})
        if record.has_trigger or record.target_indices is not None:
            row["der"] = defense_effectiveness_rating(vm["asr"], dm["asr"], vm["clean_acc"], dm["clean_acc"])
        files: dict[str, str] = {}
        if self.cfg.plots:
            files = self._common_plots(spec.run, None, dm, self.data(cell).train.classes)
            mask = record.poison_mask(len(poisoned))
            if "scores" in arr and len(arr["scores"]) == len(poisoned):
                files["scores"] = self._rel(P.plot_score_histogram(
                    arr["scores"], mask, self.out / "plots" / f"{spec.run}_scores.png",
                    f"{spec.defense_label}: suspicion scores"))
            vic = self.cache.arrays("victim", self.plan.attack_keys[(cell.index, spec.attack)][1])
            views = []
            if "pca_xy" in vic:
                views.append(("before: poisoned model, all samples", vic["pca_xy"], mask[vic["pca_idx"]]))
            if "after_xy" in arr:
                views.append(("after: defended model" + (", kept samples" if "kept" in arr else ""),
                              arr["after_xy"], mask[arr["after_idx"]]))
            elif "kept" in arr and "pca_xy" in vic:
                keep = arr["kept"][vic["pca_idx"]]
                views.append(("after: kept samples (poisoned model)", vic["pca_xy"][keep], mask[vic["pca_idx"]][keep]))
            if views:
                files["features"] = self._rel(P.plot_feature_views(
                    views, self.out / "plots" / f"{spec.run}_features.png", f"{spec.run}: penultimate features (PCA)"))
        self._write_run(spec, row, {"metrics": dm, "defense_metrics": dmet, "plots": files})
        return row

    def _rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.out))

    def _common_plots(self, run: str, history: list | None, m: dict[str, Any], classes: list[str]) -> dict[str, str]:
        from poisonlab.report import plots as P

        pdir = self.out / "plots"
        files = {}
        if history:
            files["history"] = self._rel(P.plot_history(history, pdir / f"{run}_history.png", run))
        files["confusion"] = self._rel(P.plot_confusion(np.array(m["confusion"]), classes,
                                                        pdir / f"{run}_confusion.png", f"{run}: clean test"))
        if "confusion_triggered" in m:
            files["confusion_triggered"] = self._rel(P.plot_confusion(
                np.array(m["confusion_triggered"]), classes, pdir / f"{run}_confusion_triggered.png",
                f"{run}: triggered test"))
        return files


def _after_view(model: Any, poisoned: ImageSet, record: Any, seed: int, kept: np.ndarray | None) -> dict[str, np.ndarray]:
    """PCA of the defended model's features on (the kept part of) the same sample as the 'before' view."""
    try:
        from poisonlab.training.loop import extract_features

        idx = pca_sample(len(poisoned), record.indices, seed)
        if kept is not None:
            idx = idx[np.asarray(kept, dtype=bool)[idx]]
        if len(idx) < 2:
            return {}
        return {"after_idx": idx, "after_xy": pca_2d(extract_features(model, poisoned.subset(idx)))}
    except Exception:  # wrappers without features(): no after view
        return {}


def compute_stealth(train: ImageSet, poisoned: ImageSet, record: Any) -> dict[str, Any]:
    """Stealth figures of a poisoning, if ``poisonlab.attacks.stealth`` is installed; else {}."""
    try:
        from poisonlab.attacks.stealth import stealth_metrics
    except ImportError:
        return {}
    if len(poisoned) != len(train) or poisoned.images.shape != train.images.shape:
        return {}
    try:
        return jsonable(stealth_metrics(train.images, poisoned.images, train.labels, poisoned.labels, record.indices))
    except Exception as e:  # noqa: BLE001 - stealth figures are extra information, never fatal
        return {"stealth_error": f"{type(e).__name__}: {e}"}


def _stealth_cols(st: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (st or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
