"""What a grid writes per run: the result row, ``runs/<run>.json`` and the run's plots.

:class:`RunWriter` turns what the stages return (:class:`~poisonlab.experiments.stages.Trained`,
:class:`~poisonlab.experiments.stages.Victim`, :class:`~poisonlab.experiments.stages.Defended`)
into a row and files; it computes nothing and reads no cache. The results table itself
(``results.csv`` / ``results.json``) is written by :func:`poisonlab.report.tables.write_results`.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poisonlab.experiments.plan import Run
from poisonlab.utils import atomic_write_json

if TYPE_CHECKING:
    from poisonlab.experiments.stages import Defended, Trained, Victim

ROW_METRICS = ("clean_acc", "macro_f1", "asr", "robust_acc", "target_success")


def row_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The evaluation figures that go into a result row (the rest stays in the run's JSON)."""
    return {k: m[k] for k in ROW_METRICS if k in m}


def deltas(m: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """``d_clean_acc`` and ``d_macro_f1``: ``m`` minus the cell's clean baseline (none without one)."""
    if baseline is None:
        return {}
    return {f"d_{k}": m[k] - baseline[k] for k in ("clean_acc", "macro_f1") if k in m and k in baseline}


def stealth_columns(stealth: dict[str, Any] | None) -> dict[str, Any]:
    """The numeric stealth figures of a poisoning (linf, l2, psnr, ssim, label_change_rate)."""
    return {k: v for k, v in (stealth or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunWriter:
    """Rows, run JSON files and plots of one results directory ``out``.

    Args:
        out: the results directory (``runs/`` and ``plots/`` go below it).
        plots: draw the PNG plots (``plots = false`` in a config skips them).
    """

    def __init__(self, out: str | Path, plots: bool = True):
        self.out, self.plots = Path(out), plots

    # ------------------------------------------------------------ rows
    def base_row(self, run: Run) -> dict[str, Any]:
        cell = run.cell
        return {"run": run.name, "dataset": cell.labels["dataset"], "model": cell.labels["model"],
                "training": cell.labels["training"], "attack": run.attack_label, "defense": run.defense_label,
                "seed": cell.seed, "key": run.key}

    def failed(self, run: Run, e: BaseException) -> dict[str, Any]:
        """The row of a run that raised ``e``; the traceback goes to its JSON."""
        row = self.base_row(run) | {"error": f"{type(e).__name__}: {e}"}
        self._write_json(run, row, {"traceback": traceback.format_exception(e)})
        return row

    def baseline(self, run: Run, clean: "Trained", classes: list[str]) -> dict[str, Any]:
        m = clean.metrics
        row = self.base_row(run) | row_metrics(m) | {"n_poisoned": 0, "train_seconds": clean.seconds}
        files = self._common_plots(run.name, clean.history, m, classes, [("clean model", m)]) if self.plots else {}
        self._write_json(run, row, {"metrics": m, "history": clean.history, "plots": files})
        return row

    def attack(self, run: Run, victim: "Victim", clean_train: Any, baseline: dict[str, Any] | None
               ) -> dict[str, Any]:
        """The row of a poisoned model; ``clean_train`` is the clean training set (for the example plots)."""
        m = victim.metrics
        row = (self.base_row(run) | self._poisoning_columns(victim) | row_metrics(m) | deltas(m, baseline)
               | stealth_columns(victim.stealth))
        files = self._attack_plots(run, victim, clean_train, baseline) if self.plots else {}
        self._write_json(run, row, {"metrics": m, "history": victim.history, "poisoning": victim.poisoning,
                                    "stealth": victim.stealth, "victim": victim.kind, "plots": files})
        return row

    def defense(self, run: Run, victim: "Victim", defended: "Defended", baseline: dict[str, Any] | None,
                classes: list[str]) -> dict[str, Any]:
        """The row of a defence of ``victim``: its evaluation, its own metrics and DER against the victim."""
        from poisonlab.metrics import defense_effectiveness_rating

        dm, dmet, vm = defended.metrics, defended.defense_metrics, victim.metrics
        row = (self.base_row(run) | self._poisoning_columns(victim) | stealth_columns(victim.stealth)
               | {"defense_seconds": defended.seconds} | row_metrics(dm) | deltas(dm, baseline)
               | {k: v for k, v in dmet.items() if isinstance(v, (int, float, str, bool)) or v is None})
        record = victim.poisoned.record
        if record.has_trigger or record.target_indices is not None:
            row["der"] = defense_effectiveness_rating(vm["asr"], dm["asr"], vm["clean_acc"], dm["clean_acc"])
        files = self._defense_plots(run, victim, defended, classes, baseline) if self.plots else {}
        self._write_json(run, row, {"metrics": dm, "defense_metrics": dmet, "plots": files})
        return row

    @staticmethod
    def _poisoning_columns(victim: "Victim") -> dict[str, Any]:
        return {"n_poisoned": len(victim.poisoned.record.indices), "poison_seconds": victim.poison_seconds,
                "train_seconds": victim.seconds}

    def _write_json(self, run: Run, row: dict[str, Any], detail: dict[str, Any]) -> None:
        atomic_write_json(self.out / "runs" / f"{run.name}.json", {"row": row, **detail})

    # ----------------------------------------------------------- plots
    # Plot titles leave the run's name out: the report's section and the file name carry it, and a long
    # run name in a title widened every figure until its labels were too small to read.
    def _rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.out))

    def _common_plots(self, run: str, history: list | None, m: dict[str, Any], classes: list[str],
                      per_class: list[tuple[str, dict[str, Any] | None]], target: int | None = None
                      ) -> dict[str, str]:
        """Training curves, confusion matrices and per-class accuracy bars of the metrics in ``per_class``
        (``[(label, metrics or None)]``: the run's own beside the baseline's; a None or short one is left out)."""
        from poisonlab.report import plots as P

        pdir = self.out / "plots"
        files = {}
        if history:
            files["history"] = self._rel(P.plot_history(history, pdir / f"{run}_history.png", "training curves"))
        series = [(label, pm["per_class_acc"]) for label, pm in per_class
                  if pm is not None and len(pm.get("per_class_acc") or ()) == len(classes)]
        if series:
            files["per_class"] = self._rel(P.plot_per_class_accuracy(
                series, classes, pdir / f"{run}_per_class.png", "per-class accuracy", target))
        files["confusion"] = self._rel(P.plot_confusion(np.array(m["confusion"]), classes,
                                                        pdir / f"{run}_confusion.png", "clean test"))
        if "confusion_triggered" in m:
            files["confusion_triggered"] = self._rel(P.plot_confusion(
                np.array(m["confusion_triggered"]), classes, pdir / f"{run}_confusion_triggered.png",
                "triggered test"))
        return files

    def _attack_plots(self, run: Run, victim: "Victim", clean: Any, baseline: dict[str, Any] | None
                      ) -> dict[str, str]:
        from poisonlab.report import plots as P

        poisoned, record = victim.poisoned.train, victim.poisoned.record
        files = self._common_plots(run.name, victim.history, victim.metrics, clean.classes,
                                   [("clean baseline", baseline), ("poisoned model", victim.metrics)],
                                   record.target_class)
        idx = record.indices[:8]
        if len(idx) and len(poisoned) == len(clean):
            names = clean.classes
            files["examples"] = self._rel(P.plot_examples(
                clean.images[idx], poisoned.images[idx], self.out / "plots" / f"{run.name}_examples.png",
                [names[i] for i in clean.labels[idx]], [names[i] for i in poisoned.labels[idx]],
                title=f"{record.attack}: clean vs poisoned"))
        view = victim.view
        if "pca_xy" in view:
            mask = record.poison_mask(len(poisoned))[view["pca_idx"]]
            files["features"] = self._rel(P.plot_feature_views(
                [("poisoned model, a sample (poisons over-represented)", view["pca_xy"], mask)],
                self.out / "plots" / f"{run.name}_features.png", "penultimate features (PCA)"))
        return files

    def _defense_plots(self, run: Run, victim: "Victim", defended: "Defended", classes: list[str],
                       baseline: dict[str, Any] | None) -> dict[str, str]:
        from poisonlab.report import plots as P

        files = self._common_plots(run.name, None, defended.metrics, classes,
                                   [("clean baseline", baseline), ("poisoned, no defence", victim.metrics),
                                    ("defended", defended.metrics)], victim.poisoned.record.target_class)
        files |= self._defense_array_plots(run, defended, classes)
        poisoned, arr, vic = victim.poisoned.train, defended.arrays, victim.view
        mask = victim.poisoned.record.poison_mask(len(poisoned))
        if "scores" in arr and len(arr["scores"]) == len(poisoned):
            files["scores"] = self._rel(P.plot_score_histogram(
                arr["scores"], mask, self.out / "plots" / f"{run.name}_scores.png",
                f"{run.defense_label}: suspicion scores"))
        views = []
        if "pca_xy" in vic:
            views.append(("before: poisoned model, a sample (poisons over-represented)", vic["pca_xy"],
                          mask[vic["pca_idx"]]))
        if "after_xy" in arr:
            views.append(("after: defended model" + (", kept samples" if "kept" in arr else ""),
                          arr["after_xy"], mask[arr["after_idx"]]))
        elif "kept" in arr and "pca_xy" in vic:
            keep = arr["kept"][vic["pca_idx"]]
            views.append(("after: kept samples (poisoned model)", vic["pca_xy"][keep], mask[vic["pca_idx"]][keep]))
        if views:
            files["features"] = self._rel(P.plot_feature_views(
                views, self.out / "plots" / f"{run.name}_features.png", "penultimate features (PCA)"))
        return files

    def _defense_array_plots(self, run: Run, defended: "Defended", classes: list[str]) -> dict[str, str]:
        """Plots of a defence's own arrays (Neural Cleanse's reversed triggers, STRIP's entropies). A cache
        entry written before these arrays existed, or one whose arrays do not match the metrics, has none."""
        from poisonlab.report import plots as P

        arr, dm, pdir, files = defended.arrays, defended.defense_metrics, self.out / "plots", {}
        k = len(classes)
        masks, pats = arr.get("nc_mask"), arr.get("nc_pattern")
        l1, index = dm.get("mask_l1"), dm.get("anomaly_index")
        if (masks is not None and pats is not None and masks.ndim == 3 and pats.ndim == 4
                and len(masks) == len(pats) == k and masks.shape[1:] == pats.shape[1:3]
                and isinstance(l1, list) and isinstance(index, list) and len(l1) == len(index) == k):
            files["nc_triggers"] = self._rel(P.plot_reversed_triggers(
                masks, pats, classes, l1, index, dm.get("flagged_classes") or [], pdir / f"{run.name}_nc_triggers.png",
                "Neural Cleanse: reversed trigger per class"))
        ent, thr = arr.get("strip_ent_clean"), dm.get("threshold")
        if ent is not None and ent.ndim == 1 and len(ent) and isinstance(thr, (int, float)):
            trig = arr.get("strip_ent_trig")
            files["strip_entropy"] = self._rel(P.plot_strip_entropy(
                ent, trig if trig is not None and trig.ndim == 1 else None, float(thr),
                pdir / f"{run.name}_strip_entropy.png", "STRIP: entropy of blended test inputs"))
        return files
