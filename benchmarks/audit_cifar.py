"""Audit benchmark: CIFAR-10-sized image folders poisoned with the project's own
attacks, audited with ``poisonlab.audit``; prints time and the flagged set's
precision/recall against the attacks' ground truth.

Folders (``--n`` images drawn stratified from the CIFAR-10 training set, written as PNG):

- ``patch``: BadNets patch backdoor (``badnets``, 3x3 white square, target 0);
- ``blended``: blended noise backdoor (``blended``, alpha 0.2, target 0);
- ``flips``: pairwise label flips cat<->dog and automobile<->truck (``targeted_flip``,
  symmetric, ``--flip-rate`` of each of the four classes);
- ``clean`` (not in the default list): the draw unpoisoned, to count false alarms.

    python benchmarks/audit_cifar.py --data-dir ../shared/data --n 10000

Issue targets: under 10 minutes per folder on the 2-core CPU; precision and
recall >= 0.8 for the backdoors, >= 0.6 for the label flips.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from poisonlab.attacks import get_attack
from poisonlab.audit import AuditConfig, audit_folder
from poisonlab.data import load_dataset
from poisonlab.data.imageset import ImageSet


def write_folder(data: ImageSet, root: Path) -> list[str]:
    """Write ``data`` as ``root/<class>/<i>.png``; returns the relative paths in order."""
    from PIL import Image

    rels = []
    for c in data.classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(data.images, data.labels)):
        rel = f"{data.classes[y]}/{i:05d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(root / rel)
        rels.append(rel)
    return rels


def make_attack(name: str, args: argparse.Namespace):
    if name == "patch":
        return get_attack("badnets", rate=args.rate, target=0, size=3, intensity=1.0)
    if name == "blended":
        return get_attack("blended", rate=args.rate, target=0, alpha=0.2)
    if name == "flips":
        return get_attack("targeted_flip", rate=args.flip_rate, pairs=[[3, 5], [1, 9]], symmetric=True)
    raise ValueError(name)


def detection(truth: np.ndarray, flagged: np.ndarray, finding: list[str]) -> dict:
    """Precision and recall of the flagged set against the poison mask, and the true positives by finding."""
    tp = int((truth & flagged).sum())
    fnd = np.asarray(finding)
    return {"poisoned": int(truth.sum()), "flagged": int(flagged.sum()), "precision": tp / max(1, int(flagged.sum())),
            "recall": tp / max(1, int(truth.sum())),
            "by_finding": {k: {"n": int((fnd == k).sum()), "tp": int(((fnd == k) & truth).sum())}
                           for k in ("mislabelled", "trigger")}}


def rerun_rules(args: argparse.Namespace) -> None:
    """The evidence rules alone (``combine_evidence``) on saved cross-validation outputs."""
    from poisonlab.audit import combine_evidence

    cfg = AuditConfig(min_confidence=args.min_confidence, min_pair_share=args.min_pair_share, seed=args.seed)
    print("folder   poisoned flagged precision recall | mislabelled (tp)  trigger (tp)  seconds  cv_acc")
    for name in args.folders.split(","):
        z = np.load(Path(args.from_saved) / f"{name}.npz")
        t0 = time.perf_counter()
        ev = combine_evidence(z["labels"], z["probs"], z["features"], cfg)
        secs = time.perf_counter() - t0
        d = detection(z["truth"].astype(bool), ev["flagged"], ev["finding"])
        parts = [f"{v['n']} ({v['tp']})" for v in d["by_finding"].values()]
        print(f"{name:8s} {d['poisoned']:8d} {d['flagged']:7d} {d['precision']:9.3f} "
              f"{d['recall']:6.3f} | {parts[0]:>16s} {parts[1]:>13s} {secs:8.1f}  "
              f"{(z['probs'].argmax(1) == z['labels']).mean():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--n", type=int, default=10_000, help="images per folder")
    ap.add_argument("--rate", type=float, default=0.05, help="backdoor rate (fraction of the whole folder)")
    ap.add_argument("--flip-rate", type=float, default=0.2, help="share of each of the four flipped classes")
    ap.add_argument("--folders", default="patch,blended,flips")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: the audit's own)")
    ap.add_argument("--min-confidence", type=float, default=AuditConfig.min_confidence)
    ap.add_argument("--min-pair-share", type=float, default=AuditConfig.min_pair_share)
    ap.add_argument("--widths", default="32,64,128", help="fastnet channel widths")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast while training")
    ap.add_argument("--save", default="", help="save each folder's CV probabilities, features, labels and "
                                               "ground truth to SAVE/<folder>.npz (for tuning the evidence rules)")
    ap.add_argument("--from-saved", default="", help="skip the folders and the cross-validation: re-run only the "
                                                     "evidence rules on FROM_SAVED/<folder>.npz (from --save)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--keep", default="", help="keep the folders and reports under this directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_saved:
        return rerun_rules(args)
    clean = load_dataset("cifar10", "train", data_dir=args.data_dir).stratified_subset(args.n, seed=args.seed)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="audit_cifar_"))
    rows = []
    for name in args.folders.split(","):
        if name == "clean":  # no attack: every flag is a false alarm
            poisoned, indices = clean, np.zeros(0, dtype=np.int64)
        else:
            poisoned, rec = make_attack(name, args).poison(clean, seed=args.seed)
            indices = rec.indices
        root = base / name / "data"
        if root.exists():
            shutil.rmtree(root)
        rels = write_folder(poisoned, root)
        truth = {rels[i] for i in indices}
        cfg = AuditConfig(folds=args.folds, epochs=args.epochs, min_confidence=args.min_confidence,
                          min_pair_share=args.min_pair_share, seed=args.seed,
                          widths=tuple(int(w) for w in args.widths.split(",")),
                          bf16={"auto": None, "on": True, "off": False}[args.bf16])
        t0 = time.perf_counter()
        res = audit_folder(root, base / name / "audit", cfg, progress=False, log=print)
        secs = time.perf_counter() - t0
        paths = res.data.paths
        is_poison = np.array([p in truth for p in paths])
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            order = {p: i for i, p in enumerate(rels)}
            np.savez_compressed(Path(args.save) / f"{name}.npz", probs=res.cv_pred_probs, features=res.features,
                                labels=res.data.labels, truth=is_poison,
                                true_labels=np.asarray(clean.labels)[[order[p] for p in paths]])
        row = {"folder": name, "images": len(paths), **detection(is_poison, res.flagged, res.finding),
               "seconds": round(secs, 1), "widths": args.widths, "epochs": args.epochs, "bf16": args.bf16,
               **{f"cv_{k}": round(v, 1) for k, v in res.seconds.items()},
               "cv_acc": float((res.cv_pred_probs.argmax(1) == res.data.labels).mean()),
               "classes": res.class_info}
        rows.append(row)
        print(json.dumps(row))
        if not args.keep:
            shutil.rmtree(base / name)
    print("\nfolder   images poisoned flagged precision recall seconds")
    for r in rows:
        print(f"{r['folder']:8s} {r['images']:6d} {r['poisoned']:8d} {r['flagged']:7d} {r['precision']:9.3f} "
              f"{r['recall']:6.3f} {r['seconds']:7.1f}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
