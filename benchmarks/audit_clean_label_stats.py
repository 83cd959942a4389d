"""Per-class statistics behind the audit's clean-label rule, read from the audit suite's cache (issue 19).

    python benchmarks/audit_clean_label_stats.py --out runs/audit-suite --half report-4 --half report-3 --half report-2 --half report-1 --half tune

For every cached folder of the chosen halves and every class in it, the figures a clean-label rule could
use: the ratio of the class's top two eigenvalues in features whitened by the other classes
(``top_axis_ratio``, the rule's statistic), its 2-means split's (activation clustering) silhouette and the
silhouette's robust z among the folder's classes (the previous rule's statistic), the split's smaller share, and how surely the fold models predict each side
out of sample (mean p(given label) and the share of the side at p >= 0.99). Each class is marked
``poisoned`` when the suite's ground truth puts a clean-label trigger (or a relabelled image) in it.
Run it on the development halves only: the rule is chosen there and reported on ``--half report``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audit_suite as S  # noqa: E402

from poisonlab.audit import AuditConfig, run_detectors, surer_is_small  # noqa: E402
from poisonlab.metrics import robust_z  # noqa: E402


def class_rows(folder: S.Folder, cv: dict[str, np.ndarray], cfg: AuditConfig) -> list[dict]:
    """One row per class of a folder's cached cross-validation."""
    y, probs, truth = cv["labels"], cv["probs"], cv["truth"].astype(bool)
    det = run_detectors(y, probs, cv["features"], cfg)
    info, ac = det.class_info, det.scores["activation_clustering"]
    classes = [c for c in np.unique(y) if "silhouette" in info.get(str(c), {})]
    zs = dict(zip(classes, robust_z(np.array([info[str(c)]["silhouette"] for c in classes]), min_mad=1e-6)))
    p_given = probs[np.arange(len(y)), y]
    rows = []
    for c in classes:
        idx = np.nonzero(y == c)[0]
        small = ac[idx] > 0
        if small.all() or not small.any():
            continue
        surer = small if surer_is_small(small, 1 - p_given[idx]) else ~small
        rows.append({
            "folder": folder.name, "half": folder.half, "family": folder.family, "class": int(c),
            "poisoned_share": round(float(truth[idx].mean()), 3),
            "poisons_on_surer_side": round(float(truth[idx][surer].mean()), 3),
            "silhouette": info[str(c)]["silhouette"], "silhouette_z": round(float(zs[c]), 2),
            "top_axis_ratio": info[str(c)].get("top_axis_ratio"),
            "small_share": info[str(c)]["small_share"], "surer_is_small": bool((surer == small).all()),
            "surer_share": round(float(surer.mean()), 3),
            "p_surer": round(float(p_given[idx][surer].mean()), 4),
            "p_other": round(float(p_given[idx][~surer].mean()), 4),
            "sure99_surer": round(float((p_given[idx][surer] >= 0.99).mean()), 3),
            "sure99_other": round(float((p_given[idx][~surer] >= 0.99).mean()), 3),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/audit-suite", help="the audit suite's output folder (its cache)")
    ap.add_argument("--half", action="append", default=[], choices=[h for h in S.HALVES.values() if h != "report"],
                    help="development halves to read (repeat); the report half is refused")
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args(argv)
    cfg = AuditConfig()
    model, recipe = cfg.fold_recipe(32)
    rows = []
    for folder in S.suite():
        if folder.half not in (args.half or ["tune"]):
            continue
        path = Path(args.out) / "cache" / f"{folder.name}-n{args.n}-{model}-f{cfg.folds}-e{recipe.epochs}.npz"
        if not path.exists():
            continue
        with np.load(path, allow_pickle=False) as z:
            rows += class_rows(folder, {k: z[k] for k in z.files}, cfg)
    if not rows:
        print("no cached folder of those halves")
        return 2
    w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
