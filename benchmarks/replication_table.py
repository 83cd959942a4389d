"""Markdown tables of the replication studies' measured figures (docs/REPLICATION.md).

Reads ``runs/replication/studyN/results.json`` and the per-run JSON files the grid
wrote, groups runs by (attack, defence) over seeds, and prints mean +- std
(population std over seeds; a single seed prints the value alone)::

    python benchmarks/replication_table.py                 # every study found
    python benchmarks/replication_table.py --studies 2 3

Columns: test accuracy, macro-F1, final-epoch training accuracy (on the
augmented, poisoned set, as the training loop reports it), ASR, target success
and the target's probability of its true and of the adversarial class
(targeted attacks), detection precision/recall (filters), the accuracy of the
class hit hardest, and the seconds of the poisoning, training and defence stages.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Any


def _fmt(vals: list[float], pct: bool) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    k = 100.0 if pct else 1.0
    m = mean(vals) * k
    if len(vals) == 1:
        return f"{m:.1f}" if pct else f"{m:.0f}"
    return f"{m:.1f} ± {pstdev(vals) * k:.1f}" if pct else f"{m:.0f} ± {pstdev(vals) * k:.0f}"


def _target_classes(detail: dict[str, Any]) -> tuple[int | None, int | None]:
    poisoning = detail.get("poisoning")
    if not isinstance(poisoning, dict):
        return None, None
    adv = (poisoning.get("adversarial_labels") or [None])[0]
    return (poisoning.get("extra") or {}).get("target_true_class"), adv


def _extra(detail: dict[str, Any], classes: tuple[int | None, int | None]) -> dict[str, Any]:
    m = detail.get("metrics") or {}
    out: dict[str, Any] = {}
    hist = detail.get("history") or []
    if hist:
        out["train_acc"] = hist[-1].get("acc")
    pc = m.get("per_class_acc")
    if pc:
        worst = min(range(len(pc)), key=lambda i: pc[i])
        out["worst_class"] = worst
        out["worst_acc"] = pc[worst]
    tp = m.get("target_probs")
    if tp:
        true_c, adv = classes
        out["p_true"] = tp[0][true_c] if true_c is not None else None
        out["p_adv"] = tp[0][adv] if adv is not None else None
    return out


def study_table(study_dir: Path) -> str:
    rows = json.loads((study_dir / "results.json").read_text())
    details = {}
    for r in rows:
        path = study_dir / "runs" / f"{r['run']}.json"
        details[r["run"]] = json.loads(path.read_text()) if path.exists() else {}
    # defence runs do not repeat the poisoning record: take the target's classes from the attack run
    classes = {(r.get("attack"), r.get("seed")): _target_classes(details[r["run"]]) for r in rows
               if r.get("defense", "none") == "none"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cls = classes.get((r.get("attack"), r.get("seed")), (None, None))
        groups[(r.get("attack", "none"), r.get("defense", "none"))].append(r | _extra(details[r["run"]], cls))
    cols = [("clean_acc", "test acc %", True), ("macro_f1", "macro-F1", False), ("train_acc", "train acc %", True),
            ("asr", "ASR %", True), ("target_success", "target success %", True), ("p_true", "p(true) %", True),
            ("p_adv", "p(adv) %", True), ("det_precision", "det. precision %", True),
            ("det_recall", "det. recall %", True), ("worst_acc", "worst class acc %", True),
            ("poison_seconds", "poison s", False), ("train_seconds", "train s", False),
            ("defense_seconds", "defence s", False)]
    present = [c for c in cols if any(r.get(c[0]) is not None and not (isinstance(r.get(c[0]), float)
                                                                        and math.isnan(r[c[0]]))
                                      for rs in groups.values() for r in rs)]
    head = "| attack | defence | seeds | " + " | ".join(c[1] for c in present) + " |"
    lines = [head, "|" + " --- |" * (3 + len(present))]
    for (att, dfn), rs in groups.items():
        cells = []
        for key, _, pct in present:
            if key == "macro_f1":
                vals = [r.get(key) for r in rs if r.get(key) is not None]
                cells.append(f"{mean(vals):.3f}" + (f" ± {pstdev(vals):.3f}" if len(vals) > 1 else "") if vals else "-")
            elif key == "worst_acc":
                cls = sorted({r.get("worst_class") for r in rs if r.get("worst_class") is not None})
                cells.append(_fmt([r.get(key) for r in rs], True) + (f" (class {','.join(map(str, cls))})" if cls else ""))
            else:
                cells.append(_fmt([r.get(key) for r in rs], pct))
        errors = [r["error"] for r in rs if r.get("error")]
        label = dfn + (f" (failed: {errors[0][:60]})" if errors else "")
        lines.append(f"| {att} | {label} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/replication")
    ap.add_argument("--studies", nargs="*", help="study names after \"study\": 1 2 4 4b ...")
    args = ap.parse_args()
    root = Path(args.root)
    dirs = sorted(root.glob("study*")) if not args.studies else [root / f"study{n}" for n in args.studies]
    for d in dirs:
        if not (d / "results.json").exists():
            print(f"## {d.name}: no results.json yet\n")
            continue
        print(f"## {d.name}\n\n{study_table(d)}\n")


if __name__ == "__main__":
    main()
