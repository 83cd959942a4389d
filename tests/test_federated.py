"""Federated pieces without Ray: partitions, aggregation rules, audited Flower strategies, malicious
updates, a client's local update, config errors. The Flower simulation itself is in test_federated_sim.py."""

import logging

import numpy as np
import pytest

from poisonlab.errors import ParameterError
from poisonlab.federated import aggregation as agg
from poisonlab.federated.malicious import transform_update
from poisonlab.federated.partition import dirichlet_partition, iid_partition, label_skew

logging.getLogger("flwr").setLevel(logging.ERROR)


# ----------------------------------------------------------------- partitions
def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and covering
    assert all((np.diff(p) > 0).all() for p in parts)


def test_iid_partition_disjoint_cover_balanced(digits):
    y = digits[0].labels
    parts = iid_partition(y, 10, seed=0)
    _check_cover(parts, len(y))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(y, parts) < 0.25  # each client sees about 1/10 of every class
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(y, 10, seed=1)))


def test_dirichlet_partition_skew_follows_alpha(digits):
    y = digits[0].labels
    skewed = dirichlet_partition(y, 10, alpha=0.05, seed=0)
    flat = dirichlet_partition(y, 10, alpha=1000.0, seed=0)
    for parts in (skewed, flat):
        _check_cover(parts, len(y))
        assert min(len(p) for p in parts) >= 1
    assert label_skew(y, skewed) > 0.6  # one class dominates each client
    assert label_skew(y, flat) < 0.25
    assert label_skew(y, dirichlet_partition(y, 10, alpha=0.5, seed=0)) > label_skew(y, flat)


def test_partition_bad_input():
    y = np.repeat(np.arange(3), 5)
    with pytest.raises(ParameterError, match="alpha"):
        dirichlet_partition(y, 3, alpha=0)
    with pytest.raises(ParameterError, match="num_clients"):
        iid_partition(y, 16)


# ------------------------------------------------------------ plain-array rules
def _honest_plus(outliers, n=8, d=30, seed=0):
    rng = np.random.default_rng(seed)
    honest = rng.normal(1.0, 0.1, (n, d))
    return np.vstack([honest] + [np.full((1, d), v) for v in outliers]), honest


def test_robust_rules_resist_an_outlier_and_fedavg_does_not():
    u, honest = _honest_plus([1000.0])
    truth = honest.mean(0)
    assert np.abs(agg.fedavg(u) - truth).max() > 50  # one client moves the mean anywhere
    assert np.abs(agg.coordinate_median(u) - truth).max() < 0.2
    assert np.abs(agg.trimmed_mean(u, 0.2) - truth).max() < 0.2
    assert list(agg.krum_select(u, f=1)) != [8] and 8 not in agg.krum_select(u, f=1, m=7)
    clipped, was = agg.clip_updates(u, max_norm=10.0)
    assert was.tolist() == [False] * 8 + [True] and np.linalg.norm(clipped[-1]) == pytest.approx(10.0)
    assert np.allclose(agg.fedavg(u[:2], weights=np.array([3, 1])), (3 * u[0] + u[1]) / 4)


def test_trimmed_mean_matches_scipy_and_flower():
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean
    from scipy.stats import trim_mean

    u = np.random.default_rng(1).normal(size=(11, 40))
    for beta in (0.0, 0.1, 0.3, 0.49):
        assert np.allclose(agg.trimmed_mean(u, beta), trim_mean(u, beta, axis=0))
        assert np.allclose(agg.trimmed_mean(u, beta), flower_trim_mean(u, beta))


def test_krum_scores_by_hand():
    u = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])  # n=5, f=1 -> n-f-2 = 2 neighbours
    # squared distances to the 2 nearest: 0:{1,9} 1:{1,4} 2:{4,9} 3:{1,49} 4:{1,64}
    assert agg.krum_scores(u, 1).tolist() == [10.0, 5.0, 13.0, 50.0, 65.0]
    assert agg.krum_select(u, 1).tolist() == [1]
    assert agg.krum_select(u, 1, m=3).tolist() == [0, 1, 2]


def test_exclusion_audit_and_metrics():
    u, _ = _honest_plus([-50.0, 60.0], n=10)
    ex = agg.coordinate_excluded(u, 0.2)
    assert ex.tolist() == [False] * 10 + [True, True]
    m = agg.exclusion_metrics(ex, np.arange(12) >= 11)  # only the last is truly malicious
    assert m["excl_precision"] == 0.5 and m["excl_recall"] == 1.0
    assert np.isnan(agg.exclusion_metrics(np.zeros(3, bool), np.ones(3, bool))["excl_precision"])


def test_bad_aggregator_parameters_are_named():
    with pytest.raises(ParameterError, match=r"beta must be in \[0, 0.5\)"):
        agg.trimmed_mean(np.ones((4, 2)), 0.5)
    with pytest.raises(ParameterError, match=r"f=3 needs at least 2f\+3 = 9 clients per round, got 5"):
        agg.krum_select(np.ones((5, 2)), f=3)
    with pytest.raises(ParameterError, match="m must be"):
        agg.krum_select(np.ones((5, 2)), f=1, m=5)


# ---------------------------------------------------- Flower strategies (no Ray)
@pytest.fixture
def replies():
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what a running ServerApp sets

    def make(vectors):
        out = []
        for pid, v in enumerate(vectors):
            ins = Message(content=RecordDict(), dst_node_id=100 + pid, message_type="train")
            content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(v, np.float32))}),
                                  "metrics": MetricRecord({"num-examples": 10, "partition-id": pid})})
            out.append(Message(content=content, reply_to=ins))
        return out
    return make


@pytest.mark.parametrize("name,params,expect_excluded", [
    ("fedavg", {}, []), ("median", {}, [8]), ("trimmed_mean", {"beta": 0.2}, [8]),
    ("krum", {"f": 1}, None), ("multikrum", {"f": 1, "m": 6}, None), ("norm_clip", {"clip_norm": 5.0}, [8]),
])
def test_audited_flower_strategies_aggregate_like_the_reference(replies, name, params, expect_excluded):
    from flwr.app import Array, ArrayRecord

    from poisonlab.federated.strategies import build_aggregator

    u, _ = _honest_plus([100.0], n=8, d=20)
    s = build_aggregator(name, params, n=9, num_clients=9, malicious=[8])
    if name == "norm_clip":  # the wrapper clips updates against the model it sent out
        s.current_arrays = ArrayRecord({"w": Array(np.zeros(20, np.float32))})
    arrays, _ = s.aggregate_train(1, replies(u))
    got = arrays["w"].numpy()
    ref = {"fedavg": lambda: agg.fedavg(u), "median": lambda: agg.coordinate_median(u),
           "trimmed_mean": lambda: agg.trimmed_mean(u, 0.2),
           "krum": lambda: u[agg.krum_select(u, 1)].mean(0),
           "multikrum": lambda: u[agg.krum_select(u, 1, 6)].mean(0),
           "norm_clip": lambda: agg.fedavg(agg.clip_updates(u, 5.0)[0])}[name]()
    assert np.allclose(got, ref, atol=1e-4)
    audit = s.audit[1]
    assert audit["sampled"] == list(range(9)) and audit["malicious_sampled"] == [8]
    assert 8 in audit["excluded"] if name != "fedavg" else audit["excluded"] == []
    if expect_excluded is not None:
        assert audit["excluded"] == expect_excluded
    else:
        kept = 1 if name == "krum" else 6
        assert len(audit["excluded"]) == 9 - kept and audit["excl_recall"] == 1.0


# ------------------------------------------------------------ malicious updates
def test_transform_update_modes_touch_parameters_only():
    upd = {"w": np.ones((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32)}
    keys = {"w"}
    assert np.array_equal(transform_update(upd, "sign_flip", keys, scale=4)["w"], -4 * upd["w"])
    assert np.array_equal(transform_update(upd, "model_replacement", keys, boost=10)["w"], 10 * upd["w"])
    assert np.all(transform_update(upd, "constant", keys, value=7.0)["w"] == 7.0)
    g = transform_update({"w": np.zeros(20000, np.float32)}, "gaussian", keys, sigma=3.0)["w"]
    assert abs(g.std() - 3.0) < 0.1
    for mode in ("sign_flip", "constant", "gaussian", "model_replacement"):
        assert np.array_equal(transform_update(upd, mode, keys)["bn.running_var"], upd["bn.running_var"])


def _spec(tmp_path, mode, **kw):
    from poisonlab.federated.client import ClientSpec

    return ClientSpec(dataset={"name": "digits"}, data_dir=None, model="fastnet", model_params={},
                      training={"epochs": 1, "batch_size": 32, "schedule": "none", "lr": 0.05}, num_clients=6,
                      partition="iid", alpha=0.5, clients_per_round=6, num_malicious=2, mode=mode,
                      attack=("badnets", {"rate": 0.5, "size": 2}), sybil_dir=str(tmp_path), **kw)


def test_local_updates_of_honest_byzantine_and_sybil_clients(tmp_path):
    from poisonlab.federated.client import (client_data, exchanged_keys, local_update, malicious_ids, model_arrays,
                                            new_model)

    spec = _spec(tmp_path, "sybil")
    mal = malicious_ids(6, 2, seed=0)
    honest = next(i for i in range(6) if i not in mal)
    model = new_model(spec, client_data(spec).train)
    g = model_arrays(model, exchanged_keys(model))
    a, ma = local_update(spec, mal[0], 1, 0, 0, g)
    b, mb = local_update(spec, mal[1], 1, 0, 0, g)
    h, mh = local_update(spec, honest, 1, 0, 0, g)
    assert (ma["malicious"], mb["malicious"], mh["malicious"]) == (1, 1, 0)
    assert all(np.array_equal(a[k], b[k]) for k in g)  # Sybils send the very same update
    assert not all(np.array_equal(a[k], h[k]) for k in g)
    assert any(not np.array_equal(h[k], g[k]) for k in g)  # the honest client trained
    # honest run of the same spec: the would-be Sybil trains on its own clean data
    a2, m2 = local_update(spec, mal[0], 1, 0, 0, g, honest=True)
    assert m2["malicious"] == 0 and not all(np.array_equal(a[k], a2[k]) for k in g)
    # a large-constant Byzantine client: parameters = global + value, buffers untouched
    c, _ = local_update(_spec(tmp_path, "constant", value=100.0), mal[0], 1, 0, 0, g)
    params = {n for n, _ in model.named_parameters()}
    assert all(np.allclose(c[k], g[k] + 100.0) for k in params)
    assert all(np.array_equal(c[k], g[k]) for k in g if k not in params)


# --------------------------------------------------------------------- config
BASE = {"dataset": {"name": "digits"}, "federation": {"num_clients": 5, "rounds": 1},
        "aggregators": [{"name": "fedavg"}]}


@pytest.mark.parametrize("change,message", [
    ({"malicious": {"count": 6, "mode": "sign_flip"}}, "malicious.count=6: more malicious clients than the 5"),
    ({"malicious": {"fraction": 1.5, "mode": "sign_flip"}}, "malicious.fraction=1.5 gives 8 malicious clients, more"),
    ({"aggregators": [{"name": "trimmed_mean", "beta": 0.5}]}, r"aggregators\[0\] \(trimmed_mean\).*beta must be"),
    ({"aggregators": [{"name": "krum", "f": 2}]}, r"krum: f=2 needs at least 2f\+3 = 7 clients per round, got 5"),
])
def test_bad_federated_config_raises_parameter_error(change, message):
    from poisonlab.federated.config import parse_federated_config

    with pytest.raises(ParameterError, match=message):
        parse_federated_config({**BASE, **change})


def test_config_structure_errors_name_the_field():
    from poisonlab.errors import ConfigError
    from poisonlab.federated.config import parse_federated_config

    with pytest.raises(ConfigError, match=r"malicious.*add \[malicious.attack\]"):
        parse_federated_config({**BASE, "malicious": {"count": 1, "mode": "model_replacement"}})
    with pytest.raises(ConfigError, match="federation.num_clients"):
        parse_federated_config({**BASE, "federation": {"num_clients": 1}})
    cfg = parse_federated_config({**BASE, "malicious": {"fraction": 0.2, "mode": "sybil",
                                                         "attack": {"name": "badnets", "rate": 0.5}}})
    assert cfg.num_malicious == 1


def test_cli_rejects_bad_federated_config_before_starting_ray(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "bad.toml"
    cfg.write_text('[dataset]\nname = "digits"\n[federation]\nnum_clients = 5\n'
                   '[malicious]\ncount = 7\nmode = "sign_flip"\n')
    r = subprocess.run([sys.executable, "-m", "poisonlab", "federated", str(cfg), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "malicious.count=7: more malicious clients than the 5 clients" in r.stderr + r.stdout
    assert not (tmp_path / "o").exists()
