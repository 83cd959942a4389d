"""One end-to-end run on Flower's simulation engine (Ray): 10 clients, 3 rounds, 1,000 MNIST images.

A single client sending a large constant update ruins FedAvg; the coordinate-wise
median and Krum shrug it off and their audits name the attacker every round.
Everything runs in one simulation (one Ray start-up): the honest FedAvg
baseline and the three attacked runs.
"""

import csv
import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")


@pytest.mark.timeout(900)
def test_fedavg_is_moved_by_a_byzantine_client_median_and_krum_are_not(data_root, tmp_path):
    from poisonlab.federated.config import parse_federated_config
    from poisonlab.federated.simulation import run_federated

    cfg = parse_federated_config({
        "name": "fl-ci", "seeds": [0],
        "dataset": {"name": "mnist", "train_size": 1000, "test_size": 500},
        "model": {"name": "mnist_cnn"},
        "training": {"epochs": 3, "batch_size": 10, "lr": 0.05, "schedule": "none"},
        "federation": {"num_clients": 10, "rounds": 3},
        "malicious": {"count": 1, "mode": "constant", "value": 100.0},
        "aggregators": [{"name": "fedavg"}, {"name": "median"}, {"name": "krum", "f": 1}],
        # 2 CPUs for Ray whatever the machine, one per client actor: two clients train at a time
        "simulation": {"num_cpus": 2, "client_num_cpus": 1},
    })
    rows = run_federated(cfg, tmp_path, str(data_root), log=lambda s: None)
    by = {(r["attack"], r["defense"]): r for r in rows}
    base = by[("none", "fedavg")]["clean_acc"]
    fedavg = by[("constant", "fedavg")]["clean_acc"]
    median = by[("constant", "median")]["clean_acc"]
    krum = by[("constant", "krum(f=1)")]["clean_acc"]
    assert base > 0.6, base  # honest federation learns
    assert fedavg < 0.25 and fedavg < base - 0.35, (fedavg, base)  # chance level: moved by one client
    assert median > base - 0.15 and krum > base - 0.25, (median, krum, base)
    # the robust rules excluded the attacker in every round (recall 1); FedAvg excluded nobody
    assert by[("constant", "median")]["det_recall"] == 1.0 and by[("constant", "median")]["det_precision"] == 1.0
    assert by[("constant", "krum(f=1)")]["det_recall"] == 1.0
    assert by[("constant", "fedavg")]["excluded_malicious"] == 0

    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(table) == 4
    for col in ("run", "dataset", "model", "attack", "defense", "seed", "clean_acc", "macro_f1", "asr",
                "train_seconds", "det_precision", "det_recall"):
        assert col in table[0]
    per_round = list(csv.DictReader(open(tmp_path / "rounds.csv")))
    assert len(per_round) == 4 * 4  # rounds 0..3 per run
    med = [r for r in per_round if r["aggregator"] == "median" and r["round"] != "0"]
    assert all(r["excluded"] == r["malicious_sampled"] and r["n_sampled"] == "10" for r in med)
    assert len(json.loads((tmp_path / "rounds.json").read_text())) == 16
    assert (tmp_path / "plots" / "rounds_s0.png").stat().st_size > 5000
