"""Issue 15, phase 2: failed runs show in the exit status, errors come before the work, output is safe.

Each test names the defect it guards against (issue 15's numbering).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from helpers import TINY_GRID
from typer.testing import CliRunner

from poisonlab.cli import app

QUICK = TINY_GRID


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _clean_error(res, *words: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error:" in res.output, res.output
    for w in words:
        assert w in res.output, (w, res.output)


def test_5_a_failed_run_makes_the_exit_status_non_zero(tmp_path, monkeypatch):
    """The grid goes on past a failing run and writes what succeeded, but the status says it failed."""
    from poisonlab.attacks.label_flip import RandomLabelFlip

    def boom(self, *a, **k):
        raise RuntimeError("the attack broke")

    monkeypatch.setattr(RandomLabelFlip, "_poison", boom)
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK)
    out = tmp_path / "out"
    res = _run("run", str(cfg), "--out", str(out), "--quiet")
    assert res.exit_code == 1, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["attack"] for r in rows} == {"none", "random_flip(rate=0.2)"} or len(rows) == 2
    assert sum(1 for r in rows if r["error"]) == 1 and "the attack broke" in res.output


def test_6_an_empty_config_is_refused(tmp_path):
    for name, text in (("empty.toml", ""), ("empty.yaml", ""), ("blank.yaml", "# nothing\n")):
        cfg = tmp_path / name
        cfg.write_text(text)
        _clean_error(_run("run", str(cfg), "--out", str(tmp_path / "o")), "empty", name)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["-1", "18446744073709551617"])
def test_6_seeds_out_of_range_are_refused_at_validation(tmp_path, seed):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK.replace("seeds = [0]", f"seeds = [{seed}]"))
    _clean_error(_run("run", str(cfg), "--out", str(tmp_path / "o")), "seeds", "4294967295")


def test_6_a_model_that_cannot_take_the_images_fails_before_any_work(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK.replace('name = "fastnet"\nparams = { widths = [8, 16, 16] }', 'name = "mnist_cnn"'))
    for extra in ((), ("--dry-run",)):
        out = tmp_path / f"o{len(extra)}"
        _clean_error(_run("run", str(cfg), "--out", str(out), *extra), "mnist_cnn", "8x8x1")
        assert not (out / "results.csv").exists()


def test_5_dry_run_with_a_missing_dataset_exits_non_zero(tmp_path):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK.replace('name = "digits"', 'name = "mnist"\ndata_dir = "' + str(tmp_path / "nodata") + '"'))
    res = _run("run", str(cfg), "--out", str(tmp_path / "o"), "--dry-run")
    _clean_error(res)
    assert "--download" not in res.output


def test_7_out_naming_a_file_is_refused_first(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK)
    _clean_error(_run("run", str(cfg), "--out", str(f)), "not a directory")
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    _clean_error(_run("audit", str(folder), "--out", str(f)), "not a directory")
    assert f.read_text() == "keep me"


def test_7_and_8_audit_options_checked_before_the_cross_validation(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    _clean_error(_run("audit", str(folder), "--out", str(folder / "audit")), "inside the audited folder")
    for size in ("0", "100000"):
        _clean_error(_run("audit", str(folder), "--out", str(tmp_path / "o"), "--image-size", size),
                     "--image-size", "[4, 1024]")


def test_7_markup_in_paths_is_printed_as_text(tmp_path):
    out = tmp_path / "r[/x]"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps([{"run": "a[/b]", "dataset": "digits", "model": "fastnet",
                                                   "training": "train", "attack": "none", "defense": "none",
                                                   "seed": 0, "clean_acc": 0.9}]))
    res = _run("report", str(out))
    assert res.exit_code == 0 and "Traceback" not in res.output and "r[/x]" in res.output, res.output


def test_8_cells_a_spreadsheet_would_evaluate_are_neutralised():
    from poisonlab.report.tables import spreadsheet_safe, table_csv

    assert spreadsheet_safe("=1+2") == "'=1+2" and spreadsheet_safe("@SUM(A1)") == "'@SUM(A1)"
    assert spreadsheet_safe("-0.25") == "-0.25" and spreadsheet_safe("cat") == "cat"
    text = table_csv([{"attack": "+cmd", "clean_acc": -0.5}], ["attack", "clean_acc"])
    assert "'+cmd" in text and ",-0.5" in text


def test_8_audit_csv_neutralises_class_names(tmp_path):
    from poisonlab.audit import AuditResult, write_csv
    from poisonlab.data import ImageSet

    n = 4
    data = ImageSet(np.zeros((n, 8, 8, 1), np.uint8), np.array([0, 0, 1, 1]), ["=1+2", "ok"],
                    paths=["=1+2/a.png", "=1+2/b.png", "ok/c.png", "ok/d.png"])
    z = np.zeros(n)
    res = AuditResult(data=data, score=z, flagged=z.astype(bool), finding=[""] * n, reasons=[""] * n,
                      suggested=np.array([0, 0, 1, 1]), detector_scores={}, detector_flags={},
                      cv_pred_probs=np.eye(2)[[0, 0, 1, 1]], class_info={})
    from poisonlab import audit as audit_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit_mod, "DETECTORS", ())
        write_csv(res, tmp_path / "s.csv")
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert all(not c.startswith("=") for r in rows for c in r)
    assert any(c == "'=1+2" for r in rows for c in r)


def test_9_the_audit_warns_when_its_fold_models_are_weak():
    from poisonlab.audit import AuditConfig, trust_warning

    cfg = AuditConfig()
    assert trust_warning(0.36, cfg) and "--epochs" in trust_warning(0.36, cfg)
    assert trust_warning(0.95, cfg) is None


def test_9_every_flagged_row_names_the_rule_that_flagged_it(digits):
    from poisonlab.audit import AuditConfig, combine_evidence

    tr, _ = digits
    rng = np.random.default_rng(0)
    y = tr.labels.copy()
    flip = rng.choice(len(y), 60, replace=False)
    y[flip] = (y[flip] + 1) % 10
    probs = np.eye(10)[tr.labels] * 0.9 + 0.01  # a model that knows the true labels
    feats = np.eye(10)[tr.labels] + rng.normal(0, 0.1, (len(y), 10))
    ev = combine_evidence(y, probs, feats, AuditConfig())
    assert ev["flagged"].any()
    assert all(ev["reasons"][i] for i in np.nonzero(ev["flagged"])[0])
    assert all(ev["reasons"][i].startswith(("label_issue_rule", "trigger_cluster_rule"))
               for i in np.nonzero(ev["flagged"])[0])


def test_10_files_follow_the_umask(tmp_path):
    from poisonlab.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_10_tables_printed_to_a_pipe_are_whole():
    res = _run("list")
    assert res.exit_code == 0
    assert "…" not in res.output and "corner='bottom-right'" in res.output


def test_7_federated_nan_fraction_is_a_clear_error():
    from poisonlab.errors import ConfigError, ParameterError
    from poisonlab.federated.config import FederatedConfig

    with pytest.raises((ValueError, ConfigError, ParameterError), match="finite"):
        FederatedConfig.model_validate({"malicious": {"fraction": float("nan")}})


def test_6_a_defence_whose_trusted_set_would_be_too_small_fails_before_any_work(tmp_path):
    """300 digits x clean_fraction 0.05 = 15 trusted images; STRIP needs 4 per class of 10."""
    cfg = tmp_path / "grid.toml"
    cfg.write_text(QUICK + '[[defenses]]\nname = "strip"\n')
    out = tmp_path / "o"
    _clean_error(_run("run", str(cfg), "--out", str(out)), "strip", "clean_fraction", "40")
    assert not (out / "results.csv").exists()
    cfg.write_text(QUICK.replace('seeds = [0]', 'seeds = [0]\nclean_fraction = 0.2') + '[[defenses]]\nname = "strip"\n')
    assert _run("run", str(cfg), "--out", str(out), "--dry-run").exit_code == 0
