"""Load report.html in headless Chromium: no console errors, the sortable tables and the images are there."""

import re
import shutil
import subprocess

import pytest

from poisonlab.experiments import parse_config
from poisonlab.experiments.runner import run_experiment
from poisonlab.report.html import PLOT_TITLES

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and shutil.which(p)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium) to load the report")
def test_report_loads_in_headless_chromium(tmp_path):
    # every kind of per-run plot: curves, confusion, examples, PCA, per-class bars, Neural Cleanse's
    # reversed triggers, STRIP's entropies
    cfg = parse_config({"name": "browser", "dataset": {"name": "digits", "train_size": 300, "test_size": 100},
                        "training": {"epochs": 1, "batch_size": 64}, "clean_fraction": 0.2,
                        "attacks": [{"name": "badnets", "size": 2, "rate": 0.1}],
                        "defenses": [{"name": "neural_cleanse", "steps": 10, "epochs": 1}, {"name": "strip", "n": 4}]})
    out = tmp_path / "o"
    run_experiment(cfg, out, progress=False, log=lambda s: None)
    page = out / "report.html"
    r = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom, log = r.stdout, r.stderr
    assert r.returncode == 0, log[-3000:]
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "console messages:\n" + "\n".join(console)
    # the inline script ran to its end on both tables (it marks them), so sorting is wired up
    assert dom.count('data-sortable="ready"') == 2
    assert '<table id="summary"' in dom and "clean_acc" in dom
    assert dom.count('src="data:image/png;base64,') >= 5
    for kind in ("per_class", "nc_triggers", "strip_entropy"):
        assert PLOT_TITLES[kind] in dom, kind  # the serialised DOM writes quotes unescaped
        assert re.search(rf'alt="[^"]* {kind}" src="data:image/png;base64,', dom), kind
