"""The audit challenge suite (benchmarks/audit_suite.py): its folders' ground truth, halves and scoring."""

import numpy as np
import pytest

from poisonlab.audit import AuditConfig

from helpers import load_benchmark

S = load_benchmark("audit_suite")


def test_halves_never_share_a_folder_and_held_out_kinds_are_report_only():
    folders = S.suite()
    names = [f.name for f in folders]
    assert len(names) == len(set(names))
    tune = {f.kind for f in folders if f.half == "tune"}
    report = {f.kind for f in folders if f.half == "report"}
    assert tune < report  # every tuning kind is reported on a new draw, and some kinds are never tuned on
    assert {f.seed for f in folders if f.half == "tune"} == {S.TUNE_SEED}
    assert {f.seed for f in folders if f.half == "report"} == {S.REPORT_SEED}
    # the earlier report draws (looked at once a rule was changed on them) have the same kinds as the report half
    for i in range(1, 5):
        assert {f.kind for f in folders if f.half == f"report-{i}"} == report
    assert len({S.TUNE_SEED, *S.EARLIER_REPORT_SEEDS, S.REPORT_SEED}) == 7
    assert {"backdoor", "clean_label", "flip", "clean"} <= {f.family for f in folders if f.half == "report"}


@pytest.fixture(scope="module")
def slice_(cifar_test):
    return cifar_test.stratified_subset(400, seed=0), cifar_test.stratified_subset(50, seed=1)


@pytest.mark.parametrize("kind", [f.kind for f in S.suite() if f.half == "report"])
def test_every_folder_marks_exactly_what_it_changed(slice_, kind):
    clean, other = slice_
    folder = next(f for f in S.suite() if f.kind == kind and f.half == "report")
    p = folder.make(clean, np.random.default_rng(0), other)
    changed = (p.data.labels != clean.labels) | (p.data.images != clean.images).reshape(len(clean), -1).any(1)
    truth, ignore = p.truth, p.ignore
    assert not (truth & ignore).any()
    if folder.family == "clean":
        assert not changed.any() and not truth.any()
        return
    assert truth.any() and (changed[truth]).all()  # every poison was changed ...
    assert not (changed & ~truth & ~ignore).any()  # ... and every changed image is a poison or ignored
    if folder.family == "clean_label":
        assert (p.data.labels == clean.labels).all() and (clean.labels[truth] == S.TARGET).all()
    if folder.family == "backdoor":
        assert (p.data.labels[truth] == S.TARGET).all()


def test_score_counts_precision_recall_and_ignores(slice_):
    clean, _ = slice_
    n = len(clean)
    labels = clean.labels
    probs = np.eye(clean.num_classes)[labels] * 0.9 + 0.01
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    truth = np.zeros(n, bool)
    truth[:10] = True
    ignore = np.zeros(n, bool)
    ignore[10:15] = True
    cv = {"labels": labels, "probs": probs, "features": feats, "truth": truth, "ignore": ignore,
          "cv_seconds": np.float64(3.0), "load": np.array([1.0, 2.0])}
    folder = next(f for f in S.suite() if f.kind == "clean" and f.half == "tune")
    row = S.score(folder, cv, AuditConfig())
    assert row["images"] == n - 5 and row["poisoned"] == 10 and row["load"] == 2.0 and row["seconds"] >= 3.0
    assert row["flags_without_reason"] == 0 and 0 <= row["flagged_share"] <= 1
    summary = S.summary([row | {"family": "backdoor", "precision": 0.5, "recall": 0.25},
                         row | {"family": "backdoor", "kind": "x", "precision": 0.9, "recall": 0.8},
                         row | {"family": "clean", "flagged_share": 0.004}])
    assert summary["backdoor_median_precision"] == pytest.approx(0.7)
    assert summary["backdoor_worst"].startswith("clean (0.50 / 0.25)") and summary["clean_max_flagged_share"] == 0.004


def test_set_refuses_a_field_the_audit_does_not_have():
    assert S.parse_set(["min_pair_share=0.1", "require_class_excess=false"]) == {
        "min_pair_share": 0.1, "require_class_excess": False}
    with pytest.raises(SystemExit, match="not an AuditConfig field"):
        S.parse_set(["no_such=1"])


def test_flip_bound_counts_the_oracle_pairs_and_the_argmax_ceiling():
    fb = load_benchmark("audit_flip_bound")
    true = np.repeat(np.arange(4), 50)
    labels = true.copy()
    flipped = np.zeros(len(true), dtype=bool)
    flipped[[0, 1, 2, 3, 50, 51, 52, 53]] = True  # 0 <-> 1 swapped for four images each
    labels[flipped] = 1 - true[flipped]
    probs = np.full((len(true), 4), 0.02)
    probs[np.arange(len(true)), true] = 0.94  # the model sees every image's true class ...
    probs[[0, 50]] = [0.3, 0.3, 0.2, 0.2]  # ... except two flipped images: no confident class
    probs[[0, 50], [1, 0]] = 0.31  # their argmax is their (wrong) given label
    probs /= probs.sum(1, keepdims=True)
    out = fb.flip_bound(labels, true, probs, flipped, bars=(0.5,))
    assert out["pairs"] == [(0, 1), (1, 0)] and out["flipped"] == 8
    assert out["argmax_is_true_class"] == 6
    row = {r["rule"]: r for r in out["rows"]}["any"]
    assert row["flagged"] == 6 and row["precision"] == 1.0 and row["recall"] == 6 / 8


def test_clean_label_stats_mark_the_poisoned_class_and_refuse_the_report_half(slice_):
    cs = load_benchmark("audit_clean_label_stats")
    clean, _ = slice_
    n, labels = len(clean), clean.labels
    rng = np.random.default_rng(0)
    feats = (np.eye(clean.num_classes)[labels] @ rng.normal(0, 3, (clean.num_classes, 16))
             + rng.normal(size=(n, 16))).astype(np.float32)
    truth = (labels == 0) & (np.arange(n) % 2 == 0)
    feats[truth, 3] += 6.0  # half of class 0 moved along one direction: a learnt clean-label trigger
    probs = np.eye(clean.num_classes)[labels] * 0.9 + 0.01
    probs[truth] = np.eye(clean.num_classes)[0] * 0.99 + 0.001
    cv = {"labels": labels, "probs": probs, "features": feats, "truth": truth}
    folder = next(f for f in S.suite() if f.kind == "sig-d20-half" and f.half == "tune")
    rows = {r["class"]: r for r in cs.class_rows(folder, cv, AuditConfig())}
    assert rows[0]["poisoned_share"] == pytest.approx(truth[labels == 0].mean(), abs=1e-3)
    assert rows[0]["top_axis_ratio"] == max(r["top_axis_ratio"] for r in rows.values())
    with pytest.raises(SystemExit):
        cs.main(["--half", "report"])
