"""`poisonlab audit` end to end on a small MNIST folder poisoned with the project's own label flips."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from poisonlab.attacks import get_attack
from poisonlab.audit import DETECTORS, AuditConfig, csv_columns
from poisonlab.errors import ParameterError


def _write_folder(data, root):
    from PIL import Image

    rels = []
    for i, (img, y) in enumerate(zip(data.images, data.labels)):
        rel = f"{data.classes[y]}/{i:04d}.png"
        (root / data.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(root / rel)
        rels.append(rel)
    return rels


@pytest.fixture(scope="module")
def flipped_folder(mnist_small, tmp_path_factory):
    tr, _ = mnist_small
    clean = tr.stratified_subset(900, seed=2)
    poisoned, rec = get_attack("random_flip", rate=0.1).poison(clean, seed=0)
    root = tmp_path_factory.mktemp("audit") / "digits_folder"
    rels = _write_folder(poisoned, root)
    (root / poisoned.classes[3] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root, {rels[i] for i in rec.indices}


def test_audit_cli_end_to_end(flipped_folder, tmp_path):
    from poisonlab.cli import app

    root, truth = flipped_folder
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["audit", str(root), "--out", str(out), "--folds", "3", "--epochs", "6",
                                   "--image-size", "28", "--grayscale", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "flagged" in res.output
    with open(out / "suspicious.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == csv_columns()
    assert {"path", "label", "suggested_label", "score", "flagged", "reasons"} <= set(rows[0])
    assert all(f"score_{d}" in rows[0] for d in DETECTORS)
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and broken[0]["finding"] == "unreadable"
    rows = [r for r in rows if r["finding"] != "unreadable"]
    assert len(rows) == 900 and all(not r["path"].startswith("/") for r in rows)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # most suspicious first
    flagged = {r["path"] for r in rows if r["flagged"] == "1"}
    mislabelled = {r["path"] for r in rows if r["finding"] == "likely mislabelled"}
    # what a small CPU-trained model can promise: the confident-learning evidence ranks flips well,
    # and what it calls mislabelled mostly is (activation clustering's "trigger cluster" finding
    # has no trigger to find here; its false alarms are documented in docs/audit.md)
    from sklearn.metrics import roc_auc_score

    is_flip = [r["path"] in truth for r in rows]
    assert roc_auc_score(is_flip, [float(r["score_confident_learning"]) for r in rows]) >= 0.8
    tp = len(mislabelled & truth)
    assert tp >= 10 and tp / len(mislabelled) >= 0.6, (tp, len(mislabelled))
    assert mislabelled <= flagged
    caught = [r for r in rows if r["path"] in truth and r["finding"] == "likely mislabelled"]
    assert np.mean([r["suggested_label"] != r["label"] for r in caught]) >= 0.9

    page = (out / "report.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert page.count("data:image/png;base64,") >= min(len(flagged), 20)
    assert "likely mislabelled" in page and "broken.png" in page and "Per class" in page


def test_audit_errors(tmp_path):
    from poisonlab.cli import app

    res = CliRunner().invoke(app, ["audit", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a directory" in res.output
    (tmp_path / "empty" / "a").mkdir(parents=True)
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2 and "no readable images" in res.output
    with pytest.raises(ParameterError, match="folds"):
        AuditConfig(folds=1).check()
    with pytest.raises(ParameterError, match="min_confidence"):
        AuditConfig(min_confidence=2.0).check()
