"""The Ray executor on a local Ray instance: a tiny grid, runs as tasks, cache shared with the local executor."""

import json

import pytest

ray = pytest.importorskip("ray")

from poisonlab.experiments import parse_config  # noqa: E402
from poisonlab.experiments.runner import run_experiment  # noqa: E402


def test_ray_executor_tiny_grid(tmp_path):
    cfg = parse_config({"name": "ray", "seeds": [0, 1],
                        "dataset": {"name": "digits", "train_size": 200, "test_size": 100},
                        "training": {"epochs": 1, "batch_size": 64},
                        "attacks": [{"name": "random_flip", "rate": 0.2}], "plots": False})
    log: list[str] = []
    rows = run_experiment(cfg, tmp_path / "o", progress=False, log=log.append, executor="ray", num_cpus=2,
                          cpus_per_run=1)
    assert not ray.is_initialized()  # the Ray instance it started is shut down again
    assert len(rows) == 4 and not any(r.get("error") for r in rows)
    assert any(line.startswith("ray: 2 CPU") for line in log)
    assert sorted(r["run"] for r in rows) == ["none+none+s0", "none+none+s1", "random_flip(rate=0.2)+none+s0",
                                             "random_flip(rate=0.2)+none+s1"]
    for r in rows:  # real trainings and evaluations happened in the workers
        detail = json.loads((tmp_path / "o" / "runs" / f"{r['run']}.json").read_text())
        assert len(detail["history"]) == 1 and 0 <= r["clean_acc"] <= 1 and len(detail["metrics"]["confusion"]) == 10
    # workers wrote the shared cache: a local re-run into a new directory trains nothing
    import poisonlab.training.loop as loop

    calls = []
    real = loop.fit
    loop.fit = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = run_experiment(cfg, tmp_path / "o2", cache_dir=tmp_path / "o" / "cache", progress=False,
                               log=lambda s: None)
    finally:
        loop.fit = real
    assert calls == [] and [r["clean_acc"] for r in again] == [r["clean_acc"] for r in rows]
    assert json.loads((tmp_path / "o" / "results.json").read_text())[0]["run"] == "none+none+s0"
