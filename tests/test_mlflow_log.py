"""--mlflow logs each run (params, metrics, plots) to MLflow; here a local file store."""

import pytest

mlflow = pytest.importorskip("mlflow")

from poisonlab.experiments import parse_config  # noqa: E402
from poisonlab.experiments.runner import run_experiment  # noqa: E402


def test_mlflow_file_store(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    cfg = parse_config({"name": "mlflow-test", "dataset": {"name": "digits", "train_size": 200, "test_size": 100},
                        "training": {"epochs": 2, "batch_size": 64},
                        "attacks": [{"name": "badnets", "size": 2, "rate": 0.1}]})
    rows = run_experiment(cfg, tmp_path / "o", progress=False, log=lambda s: None, mlflow_uri=uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("mlflow-test")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert sorted(r.info.run_name for r in runs) == sorted(r["run"] for r in rows)
    bd = next(r for r in runs if r.info.run_name.startswith("badnets"))
    row = next(r for r in rows if r["run"] == bd.info.run_name)
    assert bd.data.params["attack"] == row["attack"] and bd.data.params["attack.size"] == "2"
    assert abs(bd.data.metrics["clean_acc"] - row["clean_acc"]) < 1e-9 and "asr" in bd.data.metrics
    hist = mlflow.MlflowClient().get_metric_history(bd.info.run_id, "epoch_loss")
    assert [m.step for m in hist] == [1, 2]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(bd.info.run_id, "plots")}
    assert any(p.endswith("_examples.png") for p in arts) and any(p.endswith("_history.png") for p in arts)
