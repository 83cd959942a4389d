"""Run ids (issue 15, item 10): readable, safe as file names everywhere, stable; folders written with the
old naming resume (rows recognised by their key) and the report still reads them."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import poisonlab.training.loop as loop
from poisonlab.errors import ConfigError
from poisonlab.experiments import parse_config
from poisonlab.experiments.plan import MAX_NAME_CHARS, build_plan, run_id, safe_name
from poisonlab.experiments.runner import run_experiment

SAFE = re.compile(r"[A-Za-z0-9_.,=()~+-]+")
WINDOWS_FORBIDDEN = set('/\\:*?"<>|') | {chr(i) for i in range(32)}


def _plan(attacks, defenses=(), **kw):
    return build_plan(parse_config({"seeds": kw.pop("seeds", [0]), "dataset": kw.pop("dataset", {"name": "digits"}),
                                    "attacks": list(attacks), "defenses": list(defenses), **kw}), estimate=False)


def _assert_file_safe(name: str) -> None:
    assert SAFE.fullmatch(name) and not WINDOWS_FORBIDDEN & set(name), name
    assert not name.startswith((".", "-")) and not name.endswith((".", " ")), name
    assert len(name) <= MAX_NAME_CHARS, name


def test_ids_read_as_attack_plus_defence_plus_seed():
    plan = _plan([{"name": "random_flip", "rate": 0.2}, {"name": "badnets", "size": 2, "corner": "bottom-right"}],
                 [{"name": "spectral_signatures"}])
    assert list(plan.runs) == [
        "none+none+s0", "random_flip(rate=0.2)+none+s0", "random_flip(rate=0.2)+spectral_signatures+s0",
        "badnets(corner=bottom-right,size=2)+none+s0", "badnets(corner=bottom-right,size=2)+spectral_signatures+s0"]
    for name, run in plan.runs.items():  # the id splits back into the table's columns
        *_, attack, defense, seed = name.split("+")
        assert (attack, defense, seed) == (run.attack_label, run.defense_label, f"s{run.cell.seed}")


def test_ids_stay_when_other_variants_are_added_or_removed():
    small = _plan([{"name": "badnets", "size": 2, "rate": 0.1}], [{"name": "strip"}], seeds=[0])
    big = _plan([{"name": "random_flip", "rate": 0.2}, {"name": "badnets", "size": 2, "rate": [0.05, 0.1]}],
                [{"name": "spectral_signatures"}, {"name": "strip"}], seeds=[0, 1])
    assert set(small.runs) < set(big.runs)
    for name in small.runs:  # same id, same settings
        assert big.runs[name].key == small.runs[name].key


def test_a_cell_axis_names_what_varies_in_it():
    plan = _plan([{"name": "random_flip", "rate": 0.2}], model={"name": ["fastnet", "mnist_cnn"]},
                 training={"epochs": [1, 2]})
    assert "mnist_cnn+train(epochs=2)+random_flip(rate=0.2)+none+s0" in plan.runs


def test_safe_name_on_hostile_text():
    for text in ['a/b\\c:d*e?f"g<h>i|j', "..hidden", "-rf", "x.", "con", "NUL.txt", "com1", "a b\tc\nd",
                 "[/x]", "{'k': [1, 2]}", "é中", "+=1+2", "", "." * 300, "x" * 1000]:
        _assert_file_safe(safe_name(text))
    assert safe_name("con") != "con" and safe_name("NUL.txt").lower() != "nul.txt"
    assert safe_name("{'k': [1, 2]}") == "(k.(1,2))"
    long_a, long_b = run_id(["a" * 200, "none", "s0"]), run_id(["a" * 200, "none", "s1"])
    assert long_a != long_b and len(long_a) == MAX_NAME_CHARS and long_a.startswith("a" * 100)
    assert run_id(["x+y", "none", "s0"]).count("+") == 2  # a part never holds the separator


def test_ids_of_hostile_settings_are_file_safe():
    plan = _plan([{"name": "targeted_flip", "pairs": [[[3, 5], [1, 7]]]}],  # one variant: a list of pairs
                 dataset={"name": "folder", "path": ["/data/A B", "../../etc", "C:\\imgs"], "image_size": 8})
    for name in plan.runs:
        _assert_file_safe(name)
    assert "targeted_flip(pairs=((3,5),(1,7)))+none+s0" in {n.split("+", 1)[1] for n in plan.runs}


def test_ids_that_differ_only_in_case_get_a_key_tail():
    plan = _plan([{"name": "random_flip", "rate": 0.2}], dataset={"name": "folder", "path": ["/d/X", "/d/x"]})
    names = list(plan.runs)
    assert len({n.casefold() for n in names}) == len(names) == 4
    assert all("~" in n for n in names)
    with pytest.raises(ConfigError, match="give the same run"):  # the same defence twice on one attack
        _plan([{"name": "random_flip", "rate": 0.2}],
              [{"name": "strip", "apply_to": ["random_flip"]}, {"name": "strip", "apply_to": ["random_flip"]}])


QUICK = {"name": "ids", "seeds": [0], "dataset": {"name": "digits", "train_size": 300, "test_size": 100},
         "model": {"name": "fastnet", "params": {"widths": [8, 16, 16]}},
         "training": {"epochs": 1, "batch_size": 64}, "plots": True,
         "attacks": [{"name": "random_flip", "rate": 0.2}, {"name": "badnets", "size": 2, "rate": 0.1}]}
OLD_NAMES = {"none+none+s0": "none-none-s0", "random_flip(rate=0.2)+none+s0": "random_flip_rate=0.2_-none-s0",
             "badnets(rate=0.1,size=2)+none+s0": "badnets_rate=0.1_size=2_-none-s0"}


def _to_old_naming(out) -> None:
    """Rewrite a results folder as poisonlab wrote it before readable ids (slug of "-".join(...))."""
    rows = json.loads((out / "results.json").read_text())
    for r in rows:
        old = OLD_NAMES[r["run"]]
        detail = json.loads((out / "runs" / f"{r['run']}.json").read_text())
        detail["row"]["run"] = old
        (out / "runs" / f"{old}.json").write_text(json.dumps(detail))
        (out / "runs" / f"{r['run']}.json").unlink()
        r["run"] = old
    (out / "results.json").write_text(json.dumps(rows))
    (out / "results.csv").unlink()


def test_a_folder_of_the_old_naming_is_reported_and_resumed(tmp_path, monkeypatch):
    from poisonlab.report.html import write_report

    out = tmp_path / "o"
    cfg = parse_config(QUICK)
    first = run_experiment(cfg, out, progress=False, log=lambda s: None, report=False)
    assert [r["run"] for r in first] == list(OLD_NAMES)
    _to_old_naming(out)
    outside = tmp_path / "keep.json"  # a hand-edited row must not make the resume touch files outside runs/
    outside.write_text("{}")
    rows = json.loads((out / "results.json").read_text())
    rows.append(dict(rows[0], run="../../keep", key="0" * 20))
    (out / "results.json").write_text(json.dumps(rows))

    html, _ = write_report(out)  # the report reads the old names as they are
    page = html.read_text()
    assert all(old in page for old in OLD_NAMES.values()) and page.count("base64,") >= 3

    calls = []
    monkeypatch.setattr(loop, "fit", lambda *a, **k: calls.append(1))
    logs = []
    again = run_experiment(parse_config(QUICK | {"attacks": QUICK["attacks"] + [{"name": "blended", "rate": 0.1}]}),
                           out, progress=False, log=logs.append, report=False)
    assert "done already: 3" in logs[0] and "3 finished or failed run(s) recognised by their key" in logs[0]
    assert [r["run"] for r in again[:3]] == list(OLD_NAMES) and calls  # the finished rows kept, the new attack ran
    assert [r["clean_acc"] for r in again[:3]] == [r["clean_acc"] for r in first]
    for new, old in OLD_NAMES.items():
        assert not (out / "runs" / f"{old}.json").exists()
        detail = json.loads((out / "runs" / f"{new}.json").read_text())
        assert detail["row"]["run"] == new and all((out / p).is_file() for p in detail["plots"].values())
    assert outside.read_text() == "{}"
    assert {r["run"] for r in json.loads((out / "results.json").read_text())} >= set(OLD_NAMES)


def test_dry_run_on_an_old_folder_renames_nothing(tmp_path):
    out = tmp_path / "o"
    cfg = parse_config(QUICK | {"plots": False})
    run_experiment(cfg, out, progress=False, log=lambda s: None, report=False)
    _to_old_naming(out)
    before = sorted(p.name for p in (out / "runs").iterdir())
    rows = run_experiment(cfg, out, progress=False, log=lambda s: None, dry_run=True)
    assert [r["run"] for r in rows] == list(OLD_NAMES)  # reported under the current names
    assert sorted(p.name for p in (out / "runs").iterdir()) == before
    shutil.rmtree(out / "cache")  # the rows alone say what is done: nothing needs the cache
    assert build_plan(cfg, out).todo == []
