"""`poisonlab report DIR` on a results folder someone else made: it embeds only PNG files inside DIR.

A ``runs/<run>.json`` can name any path under ``plots``; the report must not turn that into a way of
reading (and publishing, base64, in report.html) files outside the folder or files that are not plots.
"""

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from poisonlab.report.html import write_report


def _results_dir(tmp_path, plots):
    out = tmp_path / "results"
    (out / "runs").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps([{"run": "r0", "attack": "none", "defense": "none", "seed": 0,
                                                   "clean_acc": 0.9}]))
    (out / "runs" / "r0.json").write_text(json.dumps({"plots": plots}))
    return out


def _embedded(page):
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]*)"', page)]


@pytest.fixture
def secret(tmp_path):
    f = tmp_path / "secret.png"  # even a real PNG outside DIR must stay out
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(f)
    return f


def test_report_embeds_its_own_png_and_nothing_outside(tmp_path, secret):
    outside_text = tmp_path / "passwd"
    outside_text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    out = _results_dir(tmp_path, {})
    (out / "plots").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(out / "plots" / "r0_history.png")
    (out / "plots" / "notes.png").write_text("not a png, a text file named .png\n")
    (out / "plots" / "link.png").symlink_to(secret)  # inside DIR by name, outside once resolved
    plots = {"history": "plots/r0_history.png", "confusion": str(outside_text), "examples": "../secret.png",
             "features": "plots/link.png", "scores": "plots/notes.png", "odd": ["plots/r0_history.png"],
             "missing": "plots/nothing.png"}
    (out / "runs" / "r0.json").write_text(json.dumps({"plots": plots}))
    with pytest.warns(UserWarning) as rec:
        write_report(out)
    page = (out / "report.html").read_text()
    embedded = _embedded(page)
    assert embedded == [(out / "plots" / "r0_history.png").read_bytes()]
    assert secret.read_bytes() not in embedded and b"root:x" not in b"".join(embedded)
    messages = [str(w.message) for w in rec]
    for field in ("confusion", "examples", "features", "scores", "odd", "missing"):
        hits = [m for m in messages if f"plots.{field}" in m]
        assert len(hits) == 1, (field, messages)
        assert "r0" in hits[0] and "skipped" in hits[0]
    assert not any("plots.history" in m for m in messages)


@pytest.mark.parametrize("detail", [[1, 2, 3], {"plots": ["plots/a.png"]}, {"plots": "plots/a.png"}, "text"])
def test_report_survives_a_run_file_of_the_wrong_shape(tmp_path, detail):
    out = _results_dir(tmp_path, {})
    (out / "runs" / "r0.json").write_text(json.dumps(detail))
    with pytest.warns(UserWarning, match="r0"):
        write_report(out)
    assert _embedded((out / "report.html").read_text()) == []


def test_report_skips_a_plot_directory_symlinked_outside(tmp_path, secret):
    out = _results_dir(tmp_path, {"history": "plots/secret.png"})
    (out / "plots").symlink_to(secret.parent, target_is_directory=True)
    with pytest.warns(UserWarning, match="plots.history"):
        write_report(out)
    assert _embedded((out / "report.html").read_text()) == []


@pytest.mark.parametrize("text", [b'{"plots": {"history": "plots/a.png"', b"[" * 100_000, b'{"plots": "\xff\xfe"}'])
def test_report_warns_on_a_run_file_that_is_not_json(tmp_path, text):
    out = _results_dir(tmp_path, {})
    (out / "runs" / "r0.json").write_bytes(text)
    with pytest.warns(UserWarning, match=r"r0\.json: run r0: not valid JSON"):
        write_report(out)
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("text,words", [
    ('[{"run": "r0", "clean_', ("not valid JSON", "truncated")),
    ("{}", ("a list of result rows", "found an object")),
    ("[1, 2, 3]", ("row 0", "found a number")),
    ('[{"clean_acc": 0.9}]', ("row 0", "without a string 'run'")),
])
def test_7_report_on_a_results_json_that_is_not_a_list_of_rows(tmp_path, text, words):
    from typer.testing import CliRunner

    from poisonlab.cli import app

    (tmp_path / "results.json").write_text(text)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "results.json" in res.output and all(w in res.output for w in words), res.output
    assert not (tmp_path / "report.html").exists()
