import csv
import json
import subprocess
import sys
from pathlib import Path

from helpers import TINY_GRID

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "poisonlab", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


def test_quickstart_end_to_end(tmp_path):
    r = _cli("run", "examples/quickstart.toml", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [row["attack"].split("(")[0] for row in rows] == ["none", "random_flip", "badnets"]
    for col in ("run", "dataset", "model", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr",
                "train_seconds"):
        assert col in rows[0]
    base, flip, bd = rows
    assert float(base["clean_acc"]) > 0.9
    assert float(flip["clean_acc"]) < float(base["clean_acc"])
    assert float(bd["asr"]) > 0.8
    detail = json.loads((tmp_path / "runs" / f"{bd['run']}.json").read_text())
    assert detail["history"] and detail["poisoning"]["n_poisoned"] == int(bd["n_poisoned"])
    for p in detail["plots"].values():
        assert (tmp_path / p).stat().st_size > 1000
    assert "results" in r.stdout


def test_bad_config_names_field(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[dataset]\nname = "digits"\n[training]\nepochs = 0\n[[attacks]]\nname = "random_flip"\nrate = 3\n')
    r = _cli("run", str(cfg), "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    err = r.stderr + r.stdout
    assert "training.epochs" in err and "attacks[0]" in err and "rate must be in (0, 1]" in err
    assert not (tmp_path / "o" / "results.csv").exists()
    cfg.write_text('[dataset]\nname = "digits"\nbogus = 1\n')
    r = _cli("run", str(cfg))
    assert r.returncode != 0 and "dataset.bogus: unknown key" in r.stderr
    r = _cli("run", str(tmp_path / "missing.toml"))
    assert r.returncode != 0 and "config file not found" in r.stderr


def test_list_shows_models_and_attacks():
    r = _cli("list")
    assert r.returncode == 0
    assert "3,251,018" in r.stdout and "badnets" in r.stdout and "random_flip" in r.stdout


# no plots; a backdoor, so that the rows have an ASR
TINY = TINY_GRID.replace("[dataset]", "plots = false\n[dataset]").replace('name = "random_flip"\nrate = 0.2',
                                                                          'name = "badnets"\nsize = 2\nrate = 0.1')


def test_run_format_json_and_csv_put_only_the_rows_on_stdout(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "o"
    r = _cli("run", str(cfg), "--out", str(out), "--format", "json")  # progress bars on: they go to stderr
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)  # strict JSON: no NaN
    assert [row["run"] for row in rows] == ["none+none+s0", "badnets(rate=0.1,size=2)+none+s0"]
    assert rows == json.loads((out / "results.json").read_text().replace("NaN", "null"))
    assert rows[0]["asr"] is None and "plan:" in r.stderr and "done already: 0" in r.stderr
    r = _cli("run", str(cfg), "--out", str(out), "--format", "csv")  # resumed: nothing to run, the same rows
    assert r.returncode == 0 and "done already: 2" in r.stderr, r.stderr
    assert r.stdout == (out / "results.csv").read_text()
    assert [row["attack"] for row in csv.DictReader(r.stdout.splitlines())] == ["none", "badnets(rate=0.1,size=2)"]
    r = _cli("run", str(cfg), "--out", str(out), "--format", "xml")
    assert r.returncode == 2 and "'xml' is not one of" in r.stderr and r.stdout == ""


def test_list_format_json_and_csv():
    r = _cli("list", "--format", "json")
    assert r.returncode == 0, r.stderr
    cat = json.loads(r.stdout)
    assert set(cat) == {"datasets", "models", "presets", "attacks", "defenses"}
    badnets = next(a for a in cat["attacks"] if a["name"] == "badnets")
    assert badnets["defaults"]["corner"] == "bottom-right" and isinstance(badnets["defaults"]["rate"], float)
    assert next(m for m in cat["models"] if m["name"] == "resnet18")["parameters"] > 10**6
    r = _cli("list", "--format", "csv")
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert r.returncode == 0 and {row["section"] for row in rows} == set(cat)
    assert len(rows) == sum(len(v) for v in cat.values())
    assert json.loads(next(row for row in rows if row["name"] == "badnets")["defaults"]) == badnets["defaults"]
