"""Run an experiment: baseline, one model per attack, each defence on each poisoned model.

Per seed: the clean model is trained once and passed to attacks that need a
surrogate; each poisoned model is trained once and shared by every defence.
Results go to ``OUT/results.csv`` (one row per run, rewritten atomically
after each run), ``OUT/runs/<run>.json`` (full metrics and history) and
``OUT/plots/``.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from poisonlab.attacks import AttackContext, Poisoning, get_attack
from poisonlab.data import ImageSet, load_dataset
from poisonlab.defenses import DefenseContext, get_defense
from poisonlab.experiments.config import ExperimentConfig, MethodConfig
from poisonlab.metrics import defense_effectiveness_rating, evaluate
from poisonlab.models import build_model
from poisonlab.training.loop import TrainConfig, fit
from poisonlab.utils import atomic_write_json, atomic_write_text, save_state_dict, seed_everything

RESULT_COLUMNS = [
    "run", "dataset", "model", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr", "robust_acc",
    "target_success", "der", "det_precision", "det_recall", "det_f1", "det_auroc", "n_poisoned",
    "poison_seconds", "train_seconds", "defense_seconds", "error",
]


@dataclass
class Data:
    train: ImageSet
    test: ImageSet


def load_data(cfg: ExperimentConfig, data_dir: str | None = None) -> Data:
    """Load the configured dataset splits (with the configured stratified subsets)."""
    d = cfg.dataset
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
    x = train.images.reshape(-1, train.shape[-1]).astype(np.float64) / 255
    return x.mean(0).tolist(), np.maximum(x.std(0), 1e-3).tolist()


def make_trainer(cfg: ExperimentConfig, data: Data, seed: int, progress: bool) -> Callable[..., nn.Module]:
    """``train_model(imageset, sample_weight=None, **recipe_overrides) -> trained model`` for this run."""
    h, w, c = data.train.shape
    mean, std = channel_stats(data.train)

    def train_model(train: ImageSet, sample_weight: np.ndarray | None = None, description: str = "train",
                    history_out: list | None = None, **overrides: Any) -> nn.Module:
        recipe = cfg.training.model_copy(update=overrides) if overrides else cfg.training
        if overrides:
            recipe = TrainConfig.model_validate(recipe.model_dump())
        seed_everything(seed)
        model = build_model(cfg.model.name, c, train.num_classes, h, mean=mean, std=std, **cfg.model.params)
        hist = fit(model, train, recipe, sample_weight=sample_weight, seed=seed, progress=progress,
                   description=description)
        if history_out is not None:
            history_out.extend(hist)
        return model

    return train_model


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:120]


class Runner:
    """Runs one :class:`ExperimentConfig` and writes its results under ``out``."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, data_dir: str | None = None,
                 progress: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.out, self.data_dir = cfg, Path(out), data_dir
        self.progress, self.log = progress, log
        self.rows: list[dict[str, Any]] = []

    # -------------------------------------------------------------- output
    def _write_results(self) -> None:
        cols = list(RESULT_COLUMNS)
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        for r in self.rows:
            wr.writerow({k: _fmt_cell(r.get(k)) for k in cols})
        atomic_write_text(self.out / "results.csv", buf.getvalue())

    def _record(self, row: dict[str, Any], detail: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_json(self.out / "runs" / f"{row['run']}.json", {"row": row, **detail})
        self._write_results()
        asr = row.get("asr")
        self.log(f"  {row['run']}: clean_acc={row['clean_acc']:.4f}"
                 + (f" asr={asr:.4f}" if isinstance(asr, float) and asr == asr else "")
                 + (f" det_f1={row['det_f1']:.3f}" if isinstance(row.get("det_f1"), float) else ""))

    def _example_plot(self, run: str, train: ImageSet, poisoned: ImageSet, record: Poisoning) -> str:
        from poisonlab.report.plots import plot_examples

        idx = record.indices[:8]
        names = train.classes
        path = plot_examples(train.images[idx], poisoned.images[idx], self.out / "plots" / f"{run}_examples.png",
                             [names[i] for i in train.labels[idx]], [names[i] for i in poisoned.labels[idx]],
                             title=f"{record.attack}: clean vs poisoned")
        return str(path.relative_to(self.out))

    def _plots(self, run: str, history: list[dict], metrics: dict, classes: list[str]) -> dict[str, str]:
        if not self.cfg.plots:
            return {}
        from poisonlab.report.plots import plot_confusion, plot_history

        pdir = self.out / "plots"
        files = {}
        if history:
            files["history"] = str(plot_history(history, pdir / f"{run}_history.png", run).relative_to(self.out))
        files["confusion"] = str(plot_confusion(np.array(metrics["confusion"]), classes,
                                                pdir / f"{run}_confusion.png", f"{run}: clean test").relative_to(self.out))
        if "confusion_triggered" in metrics:
            files["confusion_triggered"] = str(plot_confusion(
                np.array(metrics["confusion_triggered"]), classes, pdir / f"{run}_confusion_triggered.png",
                f"{run}: triggered test").relative_to(self.out))
        return files

    # ----------------------------------------------------------------- run
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", cfg.model_dump())
        data = load_data(cfg, self.data_dir)
        self.log(f"{cfg.name}: {data.train.name} train={len(data.train)} test={len(data.test)}, "
                 f"model={cfg.model.name}, {len(cfg.attacks)} attack(s), {len(cfg.defenses)} defence(s), "
                 f"seeds={cfg.seeds}")
        attacks = [(m, get_attack(m.name, **m.params)) for m in cfg.attacks]
        for _, a in attacks:  # bad parameters for this data fail before any training
            a.check(data.train)
        for seed in cfg.seeds:
            self._run_seed(data, attacks, seed)
        return self.rows

    def _base_row(self, run: str, attack: str, defense: str, seed: int) -> dict[str, Any]:
        return {"run": run, "dataset": self.cfg.dataset.name, "model": self.cfg.model.name, "attack": attack,
                "defense": defense, "seed": seed}

    def _run_seed(self, data: Data, attacks: list, seed: int) -> None:
        cfg = self.cfg
        train_model = make_trainer(cfg, data, seed, self.progress)
        clean_model = None
        if cfg.baseline or any(a.needs_clean_model for _, a in attacks):
            hist: list[dict] = []
            t0 = time.perf_counter()
            clean_model = train_model(data.train, description=f"clean s{seed}", history_out=hist)
            secs = time.perf_counter() - t0
            if cfg.baseline:
                m = evaluate(clean_model, data.test, tta_flip=cfg.training.tta_flip)
                run = f"none-none-s{seed}"
                row = self._base_row(run, "none", "none", seed) | _row_metrics(m) | {
                    "n_poisoned": 0, "train_seconds": secs}
                plots = self._plots(run, hist, m, data.train.classes)
                self._record(row, {"metrics": m, "history": hist, "plots": plots})
                save_state_dict(clean_model, self.out / "models" / f"{run}.pt")
        for mcfg, attack in attacks:
            self._run_attack(data, mcfg, attack, seed, train_model, clean_model)

    def _run_attack(self, data: Data, mcfg: MethodConfig, attack, seed: int, train_model, clean_model) -> None:
        cfg = self.cfg
        ctx = AttackContext(test=data.test, clean_model=clean_model, train_fn=train_model, progress=self.progress)
        poisoned, record = attack.poison(data.train, seed=seed, context=ctx)
        run = _slug(f"{mcfg.label}-none-s{seed}")
        hist: list[dict] = []
        t0 = time.perf_counter()
        model = train_model(poisoned, description=f"{mcfg.name} s{seed}", history_out=hist)
        secs = time.perf_counter() - t0
        m = evaluate(model, data.test, record, tta_flip=cfg.training.tta_flip)
        base = self._base_row(run, mcfg.label, "none", seed) | {
            "n_poisoned": len(record.indices), "poison_seconds": record.seconds, "train_seconds": secs}
        row = base | _row_metrics(m)
        plots = self._plots(run, hist, m, data.train.classes)
        if cfg.plots:
            plots["examples"] = self._example_plot(run, data.train, poisoned, record)
        self._record(row, {"metrics": m, "history": hist, "poisoning": record.summary(), "plots": plots})
        save_state_dict(model, self.out / "models" / f"{run}.pt")
        clean_idx = np.setdiff1d(np.arange(len(data.train)), record.indices)
        trusted = data.train.subset(clean_idx).stratified_subset(
            max(data.train.num_classes, int(cfg.clean_fraction * len(data.train))), seed=seed)
        shared_cache: dict[str, Any] = {}
        for dcfg in cfg.defenses:
            defense = get_defense(dcfg.name, **dcfg.params)
            drun = _slug(f"{mcfg.label}-{dcfg.label}-s{seed}")
            dctx = DefenseContext(train=poisoned, model=model, test=data.test, train_model=train_model,
                                  clean_set=trusted, poisoning=record, seed=seed, cache=shared_cache,
                                  progress=self.progress)
            t0 = time.perf_counter()
            result = defense.run(dctx)
            dsecs = time.perf_counter() - t0
            dm = evaluate(result.model, data.test, record, tta_flip=cfg.training.tta_flip)
            drow = base | {"run": drun, "defense": dcfg.label, "defense_seconds": dsecs} | _row_metrics(dm) | {
                k: v for k, v in result.metrics.items() if np.isscalar(v)}
            if record.has_trigger or record.target_indices is not None:
                drow["der"] = defense_effectiveness_rating(m["asr"], dm["asr"], m["clean_acc"], dm["clean_acc"])
            dplots = self._plots(drun, [], dm, data.train.classes)
            self._record(drow, {"metrics": dm, "defense_metrics": result.metrics, "plots": dplots})


def _row_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("clean_acc", "macro_f1", "asr", "robust_acc", "target_success")
    return {k: m[k] for k in keys if k in m}


def _fmt_cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return ""
    return "" if v is None else v


def run_experiment(cfg: ExperimentConfig, out: str | Path, data_dir: str | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``cfg`` and write results under ``out``; returns the result rows."""
    torch.set_float32_matmul_precision("high")
    return Runner(cfg, out, data_dir, progress, log).run()
