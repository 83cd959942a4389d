"""How well could any pair rule find label flips, given the audit's fold-model probabilities?

Reads a flip folder's cached cross-validation (written by ``benchmarks/audit_suite.py`` under
OUT/cache) and prints, for an *oracle* that knows which (given -> true) pairs were flipped (the audit
does not), the precision and recall of flagging the images of those pairs whose most probable class is
the pair's other class with p(suggested) above a bar, with and without confident learning's issue
filter; and how many flipped images have their true class as the most probable class (the recall
ceiling of any rule that suggests the argmax). A ceiling below the issue's target says the fold models,
not the pair rule, are what limits the audit on that folder.

    python benchmarks/audit_flip_bound.py runs/audit-suite/cache/flip-pairs2-10pct-d100-n10000-airnet-f4-e10.npz

Only run it on tuning-half caches (``-d100``) when choosing rules.
"""
from __future__ import annotations

import argparse

import numpy as np

from poisonlab.audit import AuditConfig
from poisonlab.defenses.filters.confident_learning import confident_learning_scores


def flip_bound(labels: np.ndarray, true_labels: np.ndarray, probs: np.ndarray, truth: np.ndarray,
               bars: tuple[float, ...] = (0.3, 0.5, 0.55, 0.6, 0.7, 0.8)) -> dict:
    """The oracle's precision/recall per bar on p(suggested), and the argmax recall ceiling."""
    n = len(labels)
    _, issues, suggested = confident_learning_scores(labels, probs, min_confidence=AuditConfig.min_confidence)
    p_sug = probs[np.arange(n), suggested]
    flipped_pairs = set(zip(labels[truth].tolist(), true_labels[truth].tolist()))
    in_pair = np.array([(int(a), int(b)) in flipped_pairs for a, b in zip(labels, suggested)]) & (suggested != labels)
    rows = []
    for bar in bars:
        for rule, mask in (("label issue", in_pair & issues & (p_sug >= bar)), ("any", in_pair & (p_sug >= bar))):
            tp = int((mask & truth).sum())
            rows.append({"bar": bar, "rule": rule, "flagged": int(mask.sum()),
                         "precision": tp / max(int(mask.sum()), 1), "recall": tp / max(int(truth.sum()), 1)})
    return {"pairs": sorted(flipped_pairs), "flipped": int(truth.sum()), "rows": rows,
            "argmax_is_true_class": int(((suggested == true_labels) & truth).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", nargs="+", help="OUT/cache/<flip folder>.npz files of benchmarks/audit_suite.py")
    for path in ap.parse_args().cache:
        with np.load(path, allow_pickle=False) as z:
            out = flip_bound(z["labels"], z["true_labels"], z["probs"], z["truth"].astype(bool))
        print(f"{path}: {out['flipped']} flipped in pairs (given, true) {out['pairs']}; "
              f"{out['argmax_is_true_class']} have their true class most probable")
        for r in out["rows"]:
            print(f"  p(suggested) >= {r['bar']:.2f}, {r['rule']:<11}: flagged {r['flagged']:5d}  "
                  f"precision {r['precision']:.2f}  recall {r['recall']:.2f}")


if __name__ == "__main__":
    main()
