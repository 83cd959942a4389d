"""The HTML report and results.md, from a real (tiny) grid with two seeds and a filter."""

import json
import re

import numpy as np
import pytest

from poisonlab.defenses import DEFENSES, Filter, FilterOutput
from poisonlab.experiments import parse_config
from poisonlab.experiments.runner import run_experiment


class _LabelDisagreement(Filter):
    """Test-only filter: flags the 10% of samples whose label the trained model believes least."""

    def score(self, ctx):
        p = ctx.pred_probs()
        s = 1 - p[range(len(p)), ctx.train.labels]
        return FilterOutput(s, s >= np.quantile(s, 0.9))


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    DEFENSES.register("t_report_filter")(_LabelDisagreement)
    try:
        out = tmp_path_factory.mktemp("report")
        cfg = parse_config({"name": "report-test", "seeds": [0, 1],
                            "dataset": {"name": "digits", "train_size": 300, "test_size": 120},
                            "training": {"epochs": 2, "batch_size": 64},
                            "attacks": [{"name": "badnets", "size": 2, "rate": 0.1, "target": 0}],
                            "defenses": [{"name": "t_report_filter"}]})
        run_experiment(cfg, out, progress=False, log=lambda s: None)
        yield out
    finally:
        DEFENSES._items.pop("t_report_filter", None)


def test_report_is_self_contained_with_table_and_plots(grid_dir):
    page = (grid_dir / "report.html").read_text()
    assert '<table id="summary" class="sortable">' in page and '<table id="runs" class="sortable">' in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    kinds = set(re.findall(r"<figcaption>([^<]+)</figcaption>", page))
    assert len(imgs) >= 10
    from poisonlab.report.html import PLOT_TITLES

    for k in ("training curves", "confusion matrix (clean test)", "confusion matrix (triggered test)",
              "clean vs poisoned examples, |difference| amplified", PLOT_TITLES["features"], "detection scores"):
        assert k in kinds, k
    assert "PCA of a sample" in PLOT_TITLES["features"]  # says it is a sample, poisons over-represented
    assert "<h2>Overview</h2>" in page
    # summary rows: baseline, attack, attack + filter, each over 2 seeds with mean ± std
    summary = page.split('<table id="summary"')[1].split("</table>")[0]
    assert summary.count("<tr") == 1 + 3 and "±" in summary
    for col in ("clean_acc", "d_clean_acc", "macro_f1", "asr", "robust_acc", "der", "det_precision", "det_recall",
                "det_f1", "train_seconds", "defense_seconds"):
        assert f">{col}</th>" in summary, col


def test_results_md_and_report_command(grid_dir, tmp_path):
    md = (grid_dir / "results.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3 and "| attack | defense | n | clean_acc |" in lines[0]
    base = next(line for line in lines if line.startswith("| none | none |"))
    assert "| 2 |" in base and "±" in base
    # the report command rewrites both from the results directory alone
    (grid_dir / "report.html").unlink()
    from typer.testing import CliRunner

    from poisonlab.cli import app

    r = CliRunner().invoke(app, ["report", str(grid_dir)])
    assert r.exit_code == 0, r.output
    assert (grid_dir / "report.html").stat().st_size > 10_000
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "no results.json or results.csv" in r.output


def test_run_json_has_filter_details(grid_dir):
    rows = json.loads((grid_dir / "results.json").read_text())
    f = [r for r in rows if r["defense"] == "t_report_filter"]
    assert len(f) == 2 and all(0 <= r["det_recall"] <= 1 and r["der"] == r["der"] for r in f)
    detail = json.loads((grid_dir / "runs" / f"{f[0]['run']}.json").read_text())
    assert "removed_per_class" in detail["defense_metrics"] and "scores" in detail["plots"]
