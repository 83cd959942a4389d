"""The report opens on an overview figure (issue 15, item 11)."""

import json

from poisonlab.report.plots import grid_axes, overview_png


def _rows():
    rows = []
    for seed in (0, 1):
        rows.append({"run": f"c{seed}", "dataset": "digits", "model": "fastnet", "training": "train",
                     "attack": "none", "defense": "none", "seed": seed, "clean_acc": 0.95})
        for rate, asr in ((0.05, 0.6), (0.1, 0.9)):
            a = f"badnets(rate={rate},size=2)"
            rows.append({"run": f"b{rate}{seed}", "dataset": "digits", "model": "fastnet", "training": "train",
                         "attack": a, "defense": "none", "seed": seed, "clean_acc": 0.94, "asr": asr + 0.01 * seed})
            rows.append({"run": f"d{rate}{seed}", "dataset": "digits", "model": "fastnet", "training": "train",
                         "attack": a, "defense": "spectral_signatures", "seed": seed, "clean_acc": 0.93,
                         "asr": 0.05, "der": 0.9})
    return rows


def test_grid_axes_find_the_varied_parameter():
    from poisonlab.report.tables import summarize

    axes = grid_axes(summarize(_rows()))
    assert [(n, p, [x for x, _ in pts]) for n, p, pts in axes] == [("badnets", "rate", [0.05, 0.1])]


def test_overview_in_the_report(tmp_path):
    from poisonlab.report.html import write_report
    from poisonlab.report.tables import summarize

    png = overview_png(summarize(_rows()))
    assert png is not None and png.startswith(b"\x89PNG")
    assert overview_png(summarize([r for r in _rows() if r["attack"] == "none"])) is None  # nothing to plot
    (tmp_path / "results.json").write_text(json.dumps(_rows()))
    html, _ = write_report(tmp_path)
    text = html.read_text()
    assert "<h2>Overview</h2>" in text and text.index("Overview") < text.index("<h2>Results</h2>")
