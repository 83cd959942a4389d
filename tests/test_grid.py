"""Grids: expansion and planning, the artifact cache (train once), failures, and resume after SIGKILL."""

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import poisonlab.training.loop as loop
from poisonlab.defenses import DEFENSES, Defense, DefenseResult, Filter, FilterOutput
from poisonlab.errors import ConfigError
from poisonlab.experiments import parse_config
from poisonlab.experiments.cache import ArtifactCache, poisoning_from_entry, poisoning_to_entry
from poisonlab.experiments.plan import build_plan
from poisonlab.experiments.runner import run_experiment

REPO = Path(__file__).resolve().parents[1]
SEEN_CACHES: list = []
_CACHE_TOKENS = itertools.count()


# ---- test-only defences, registered for this module and removed afterwards --------------------------
class _TestFilter(Filter):
    """Flags the `top` share of samples by distance of their penultimate features to the class mean."""

    def __init__(self, top: float = 0.1):
        self.top = top

    def score(self, ctx):
        had = "features" in ctx.cache
        # a token kept in the dict, not id(): ids of collected dicts are reused, which merged two caches here
        token = ctx.cache.setdefault("_test_token", next(_CACHE_TOKENS))
        SEEN_CACHES.append((self.registry_name, token, had))
        f = ctx.features()
        y = ctx.train.labels
        means = np.stack([f[y == k].mean(0) if (y == k).any() else np.zeros(f.shape[1])
                          for k in range(ctx.train.num_classes)])
        s = np.linalg.norm(f - means[y], axis=1)
        return FilterOutput(s, s >= np.quantile(s, 1 - self.top))


class _TestNoop(Defense):
    kind = "detection"

    def __init__(self, level: int = 0):
        self.level = level

    def run(self, ctx):
        return DefenseResult(model=ctx.model, metrics={"noop_level": self.level, "per_class": [1, 2, 3]})


class _TestBroken(Defense):
    def run(self, ctx):
        raise RuntimeError("deliberately broken defence")


@pytest.fixture(scope="module", autouse=True)
def test_defenses():
    names = {"t_filter_a": type("TA", (_TestFilter,), {}), "t_filter_b": type("TB", (_TestFilter,), {}),
             "t_filter_c": type("TC", (_TestFilter,), {}), "t_noop_a": type("NA", (_TestNoop,), {}),
             "t_noop_b": type("NB", (_TestNoop,), {}), "t_broken": _TestBroken}
    for n, c in names.items():
        DEFENSES.register(n)(c)
    yield
    for n in names:
        DEFENSES._items.pop(n, None)


def _cfg(defenses, attacks=None, seeds=(0,), **kw):
    return parse_config({
        "name": "t", "seeds": list(seeds),
        "dataset": {"name": "digits", "train_size": 300, "test_size": 150},
        "model": {"name": "fastnet"},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "attacks": attacks if attacks is not None else [
            {"name": "random_flip", "rate": 0.2}, {"name": "badnets", "size": 2, "target": 0, "rate": [0.1, 0.2]}],
        "defenses": defenses, "plots": False, **kw})


@pytest.fixture
def count_fit(monkeypatch):
    calls = []
    real = loop.fit

    def counting(*a, **k):
        calls.append(k.get("description"))
        return real(*a, **k)

    monkeypatch.setattr(loop, "fit", counting)
    return calls


def test_lists_expand_and_errors_name_the_field():
    cfg = parse_config({"seeds": [0, 1], "dataset": {"name": "digits", "train_size": [100, 200]},
                        "model": {"name": ["fastnet", "mnist_cnn"]}, "training": {"epochs": [1, 2]},
                        "attacks": [{"name": "badnets", "rate": [0.05, 0.1], "size": 2}],
                        "defenses": [{"name": "t_noop_a", "level": [1, 2, 3]}]})
    assert (len(cfg.dataset), len(cfg.model), len(cfg.training)) == (2, 2, 2)
    plan = build_plan(cfg)
    cells = 2 * 2 * 2 * 2
    assert len(plan.cells) == cells and len(plan.runs) == cells * (1 + 2 * (1 + 3))
    assert len(set(plan.runs)) == len(plan.runs)
    with pytest.raises(ConfigError) as e:
        parse_config({"attacks": [{"name": "random_flip", "rate": [0.1, 3]}], "training": {"epochs": [1, 0]}})
    assert "attacks[0] (random_flip): rate must be in (0, 1], got 3" in str(e.value)
    assert "training.epochs" in str(e.value)


def test_apply_to_limits_a_defence_to_named_attacks():
    cfg = parse_config({"attacks": [{"name": "random_flip", "rate": 0.2}, {"name": "badnets", "size": 2}],
                        "defenses": [{"name": "t_noop_a", "apply_to": ["badnets"]},
                                     {"name": "t_noop_a", "level": 2}]})
    plan = build_plan(cfg, estimate=False)
    defended = sorted((r.attack_label, r.defense_label) for r in plan.runs.values() if r.kind == "defense")
    assert defended == [("badnets(size=2)", "t_noop_a"), ("badnets(size=2)", "t_noop_a(level=2)"),
                        ("random_flip(rate=0.2)", "t_noop_a(level=2)")]
    assert "limited by apply_to" in plan.describe()
    with pytest.raises(ConfigError) as e:
        parse_config({"attacks": [{"name": "random_flip"}],
                      "defenses": [{"name": "t_noop_a", "apply_to": ["blended"]}]})
    assert "defenses[0] (t_noop_a): apply_to names 'blended', which is not an attack of this config" in str(e.value)


def test_filter_without_retraining_detects_only(tmp_path, count_fit):
    cfg = _cfg([{"name": "t_filter_a", "retrain": False}, {"name": "t_filter_a"}],
               attacks=[{"name": "badnets", "size": 2, "target": 0, "rate": 0.1}])
    both = _cfg([{"name": "t_filter_a"}, {"name": "t_filter_b"}], attacks=cfg.model_dump()["attacks"])
    needed = [build_plan(c, tmp_path / "p", ArtifactCache(tmp_path / "p" / "cache"), estimate=False).trainings_needed
              for c in (cfg, both)]
    assert needed[1] - needed[0] == 1  # the detect-only filter trains nothing
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    assert len(count_fit) == 3, count_fit
    attack = next(r for r in rows if r["defense"] == "none" and r["attack"] != "none")
    detect = next(r for r in rows if r["defense"] == "t_filter_a(retrain=False)")
    full = next(r for r in rows if r["defense"] == "t_filter_a")
    # same scores and flags either way; only the retrained model differs from the poisoned one
    assert detect["det_f1"] == full["det_f1"] and 0 <= detect["det_recall"] <= 1
    assert detect["clean_acc"] == attack["clean_acc"] and detect["asr"] == attack["asr"]
    with pytest.raises(ConfigError, match=r"defenses\[0\] \(t_noop_a\): retrain = false is for filter defences only"):
        _cfg([{"name": "t_noop_a", "retrain": False}])


def test_train_once_share_and_reuse_across_grids(tmp_path, count_fit):
    """1 dataset x 1 model x 3 attacks x 4 defences (2 retraining): 1 + 3 + 2 x 3 trainings, then none."""
    defs = [{"name": "t_filter_a"}, {"name": "t_filter_b", "top": 0.15}, {"name": "t_noop_a"}, {"name": "t_noop_b"}]
    cfg = _cfg(defs)
    SEEN_CACHES.clear()
    rows = run_experiment(cfg, tmp_path / "a", progress=False, log=lambda s: None)
    assert len(count_fit) == 1 + 3 + 2 * 3, count_fit
    assert len(rows) == 1 + 3 * 5 and not any(r.get("error") for r in rows)
    # the two filters of one poisoned set share one DefenseContext.cache: the second finds the features there
    by_cache = {}
    for name, cid, had in SEEN_CACHES:
        by_cache.setdefault(cid, []).append(had)
    assert sorted(map(tuple, by_cache.values())) == [(False, True)] * 3
    bd = [r for r in rows if r["attack"].startswith("badnets")]
    assert all(r["der"] == r["der"] for r in bd if r["defense"] != "none")
    filt = [r for r in rows if r["defense"].startswith("t_filter")]
    assert all(0 <= r["det_f1"] <= 1 and "d_clean_acc" in r for r in filt)
    noop = next(r for r in rows if r["defense"] == "t_noop_a" and r["attack"] == "random_flip(rate=0.2)")
    att = next(r for r in rows if r["defense"] == "none" and r["attack"] == "random_flip(rate=0.2)")
    assert noop["clean_acc"] == att["clean_acc"] and noop["noop_level"] == 0
    detail = json.loads((tmp_path / "a" / "runs" / f"{noop['run']}.json").read_text())
    assert detail["defense_metrics"]["per_class"] == [1, 2, 3]  # non-scalars go to the run JSON only

    # the same command again: everything is done, nothing trains
    count_fit.clear()
    again = run_experiment(cfg, tmp_path / "a", progress=False, log=lambda s: None)
    assert count_fit == [] and [r["clean_acc"] for r in again] == [r["clean_acc"] for r in rows]

    # another grid sharing the cache: only the new retraining defence trains (once per poisoned model),
    # its filter finds the features computed by the first grid, and a failing defence is recorded
    SEEN_CACHES.clear()
    log = []
    cfg2 = _cfg(defs[:1] + [{"name": "t_filter_c"}, {"name": "t_broken"}])
    rows2 = run_experiment(cfg2, tmp_path / "b", cache_dir=tmp_path / "a" / "cache", progress=False, log=log.append)
    assert len(count_fit) == 3, count_fit
    assert [had for name, _, had in SEEN_CACHES if name == "t_filter_c"] == [True] * 3
    broken = [r for r in rows2 if r["defense"] == "t_broken"]
    assert len(broken) == 3 and all("deliberately broken" in r["error"] for r in broken)
    assert sum(1 for r in rows2 if not r.get("error")) == len(rows2) - 3
    assert "reused from the cache" in log[0]


def test_poisoning_cache_roundtrip(digits, tmp_path):
    from poisonlab.attacks import get_attack

    tr, _ = digits
    p, r = get_attack("badnets", size=2, rate=0.1, target=3).poison(tr, seed=1)
    meta, arrays = poisoning_to_entry(tr.images, tr.labels, p, r)
    c = ArtifactCache(tmp_path)
    c.put("poison", "k", meta, arrays)
    p2, r2 = poisoning_from_entry(tr, c.meta("poison", "k"), c.arrays("poison", "k"))
    assert np.array_equal(p2.images, p.images) and np.array_equal(p2.labels, p.labels)
    assert np.array_equal(r2.indices, r.indices) and r2.target_class == 3
    assert np.array_equal(r2.apply_trigger(tr.images[:5]), r.apply_trigger(tr.images[:5]))
    # nothing in the entry needs pickle
    with np.load(c.path("poison", "k") / "arrays.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    # every registered dataclass trigger survives the JSON + npz round trip
    from poisonlab.experiments.cache import _trigger_classes, trigger_from_spec, trigger_to_spec

    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    tried = 0
    for cls in _trigger_classes().values():
        try:
            trig = cls()
            want = trig.apply(imgs)
        except Exception:  # needs arguments or other shapes: not a default-constructible trigger
            continue
        spec, arrs = trigger_to_spec(trig)
        back = trigger_from_spec(json.loads(json.dumps(spec)), arrs)
        assert type(back) is cls and np.array_equal(back.apply(imgs), want), cls
        tried += 1
    assert tried >= 1
    with pytest.raises(ValueError, match="unknown trigger class"):
        trigger_from_spec({"class": "os.system", "fields": {}}, {})


def test_planning_1000_runs_is_fast(tmp_path):
    from poisonlab.experiments import plan as plan_mod

    cfg = parse_config({"seeds": list(range(10)), "dataset": {"name": "digits"},
                        "attacks": [{"name": "random_flip", "rate": [0.02 * i for i in range(1, 10)]}],
                        "defenses": [{"name": "t_noop_a", "level": list(range(10))}]})
    out = tmp_path / "o"
    (out / "cache").mkdir(parents=True)
    t0 = time.perf_counter()
    plan = build_plan(cfg, out, ArtifactCache(out / "cache"), estimate=False)
    text = plan.describe()
    secs = time.perf_counter() - t0
    assert len(plan.runs) == 1000 and "to run: 1000" in text
    assert plan.trainings_needed == 10 + 90 and plan.trainings_reused == 0
    assert secs < 2.0, f"planning 1000 runs took {secs:.2f}s"
    # the time estimate (a few timed training steps when nothing was measured before) is separate
    plan_mod._BENCH.clear()
    plan = build_plan(cfg, out, ArtifactCache(out / "cache"))
    assert plan.seconds_estimate and plan.seconds_estimate > 0 and "estimate: ~" in plan.describe()


def test_time_estimate_steps_in_the_trainings_precision(monkeypatch):
    """The estimate times its steps under the autocast the training will use (a float32 step costs 2-3x
    a bf16 one on 32x32 images, and timing float32 overstated a CIFAR-10 grid threefold)."""
    import torch

    from poisonlab.experiments import plan as plan_mod
    from poisonlab.experiments.config import DatasetConfig, ModelConfig
    from poisonlab.training import TrainConfig

    seen = []
    real = torch.autocast

    def recording(device_type, dtype=None, enabled=True, **kw):
        seen.append(enabled)
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording)
    ds, model = DatasetConfig(name="digits"), ModelConfig(name="cnn3")
    for bf16 in (True, False):
        plan_mod._BENCH.clear()
        seen.clear()
        s = plan_mod.bench_training_seconds(ds, model, TrainConfig(epochs=2, batch_size=32, bf16=bf16))
        assert s is not None and s > 0
        assert seen and set(seen) == {bf16}
    plan_mod._BENCH.clear()


def _wait_rows(f: Path, n: int, proc, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if len([r for r in json.loads(f.read_text()) if not r.get("error")]) >= n:
                return
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            return
        time.sleep(0.05)


def test_sigkill_then_resume(tmp_path):
    """Kill a grid (SIGKILL) after its first run; the same command then runs exactly the other runs."""
    cfg = tmp_path / "g.toml"
    cfg.write_text('name = "resume"\nseeds = [0, 1]\n[dataset]\nname = "digits"\ntrain_size = 400\ntest_size = 150\n'
                   '[training]\nepochs = 2\nbatch_size = 64\n'
                   '[[attacks]]\nname = "random_flip"\nrate = 0.2\n'
                   '[[attacks]]\nname = "badnets"\nsize = 2\nrate = 0.1\n')
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "poisonlab", "run", str(cfg), "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_rows(out / "results.json", 1, p, 300)  # kill right after the first run: five remain
    assert p.poll() is None, "the grid finished before it could be killed: " + p.stdout.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = json.loads((out / "results.json").read_text())  # never half-written
    assert 1 <= len(first) < 6
    mtimes = {r["run"]: (out / "runs" / f"{r['run']}.json").stat().st_mtime_ns for r in first}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"done already: {len(first)}; to run: {6 - len(first)}" in r.stdout
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6 and not any(x.get("error") for x in rows)
    for run, m in mtimes.items():  # finished runs were not run again
        assert (out / "runs" / f"{run}.json").stat().st_mtime_ns == m
    md = (out / "results.md").read_text()
    assert "±" in md and "badnets" in md  # two seeds: mean ± std
    assert (out / "report.html").stat().st_size > 10_000


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from poisonlab.cli import app

    cfg = tmp_path / "g.toml"
    cfg.write_text('seeds = [0, 1]\n[dataset]\nname = "digits"\n[training]\nepochs = [1, 2]\n'
                   '[[attacks]]\nname = "badnets"\nsize = 2\nrate = [0.05, 0.1]\n')
    r = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "plan: 12 runs" in r.output and "to run: 12" in r.output and "trainings: 12 to do" in r.output
    assert "estimate: ~" in r.output
    assert not (tmp_path / "o").exists()


def test_frozen_feature_victim_starts_from_clean_model(tmp_path, monkeypatch):
    """Attacks that ask for a frozen-features victim get the clean model with only the head retrained."""
    from poisonlab.attacks import ATTACKS

    if "feature_collision" not in ATTACKS:
        pytest.skip("feature_collision attack not present")
    calls = []
    real = loop.fit

    def spy(model, train, cfg=None, **k):
        calls.append((k.get("description"), k.get("freeze_body", False)))
        return real(model, train, cfg, **k)

    monkeypatch.setattr(loop, "fit", spy)
    cfg = _cfg([], attacks=[{"name": "feature_collision", "steps": 5, "n_poisons": 3}], baseline=False)
    rows = run_experiment(cfg, tmp_path / "fc", progress=False, log=lambda s: None)
    assert not any(r.get("error") for r in rows), rows
    assert calls == [("clean s0", False), ("feature_collision s0", True)]
    detail = json.loads((tmp_path / "fc" / "runs" / f"{rows[0]['run']}.json").read_text())
    assert detail["victim"] == "frozen_features" and "target_success" in rows[0]


def test_defences_run_when_the_attack_leaves_no_clean_sample(tmp_path):
    # class-wise noise perturbs every image: a defence that needs no trusted set still runs,
    # one that needs it fails its own row with an error naming the clean set
    # clean_fraction 0.2 (60 of 300 images) passes the plan-time size check; the attack then leaves none
    cfg = _cfg([{"name": "t_noop_a"}, {"name": "finetune", "epochs": 1}],
               attacks=[{"name": "classwise_random"}], clean_fraction=0.2)
    rows = run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    noop = next(r for r in rows if r["defense"] == "t_noop_a")
    fine = next(r for r in rows if r["defense"].startswith("finetune"))
    assert not noop.get("error") and noop["clean_acc"] > 0
    assert "clean" in fine["error"]


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parent.parent / "examples").rglob("*.toml")
                                        if "federated" not in p.name))
def test_shipped_grid_configs_load_and_plan(path, tmp_path):
    """Every experiment config under examples/ parses, validates its attacks and defences and plans."""
    from poisonlab.experiments import load_config

    cfg = load_config(path)
    out = tmp_path / "o"
    (out / "cache").mkdir(parents=True)
    plan = build_plan(cfg, out, ArtifactCache(out / "cache"), estimate=False)
    assert len(plan.runs) >= 1 and "to run:" in plan.describe()


def test_a_defence_row_is_written_before_the_next_defence_runs(tmp_path, monkeypatch):
    """A victim's defences can take hours together: stopping between two keeps the first one's row."""
    from poisonlab.experiments.stages import Workspace

    real, seen = Workspace.defend, []

    def stop_at_the_second(self, run, *a, **k):
        seen.append(run.defense.label)
        if len(seen) == 2:
            rows = list(csv.DictReader(open(tmp_path / "results.csv")))
            assert [r["defense"] for r in rows if r["defense"] != "none"] == [seen[0]]
            raise KeyboardInterrupt  # the user stops the run here
        return real(self, run, *a, **k)

    monkeypatch.setattr(Workspace, "defend", stop_at_the_second)
    cfg = _cfg([{"name": "t_noop_a"}, {"name": "t_noop_b"}], attacks=[{"name": "random_flip", "rate": 0.2}])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["defense"] for r in rows] == ["none", "none", "t_noop_a"] and not rows[2]["error"]
