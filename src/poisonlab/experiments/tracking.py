"""Logging runs to MLflow (optional: ``pip install 'poisonlab[mlflow]'``; imported only when asked for)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PARAM_KEYS = ("dataset", "model", "training", "attack", "defense", "seed", "key")


class MlflowTracker:
    """One MLflow run per grid run, in the experiment named after the config.

    Logged: the row's identifying fields and the attack/defence parameters as
    params, every numeric row value as a metric (plus per-epoch loss and
    accuracy as stepped metrics), and the run's plots and JSON as artifacts.
    """

    def __init__(self, uri: str, experiment: str):
        try:
            import mlflow
        except ImportError:
            from poisonlab.errors import ConfigError

            raise ConfigError("--mlflow needs MLflow: pip install 'poisonlab[mlflow]'") from None
        import os

        self.mlflow = mlflow
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses the file store unless asked for; a file URI given on purpose is that request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else mlflow.create_experiment(experiment)

    def log_run(self, out: Path, row: dict[str, Any]) -> None:
        mlflow = self.mlflow
        detail_file = out / "runs" / f"{row['run']}.json"
        detail = json.loads(detail_file.read_text()) if detail_file.is_file() else {}
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=row["run"]):
            params = {k: str(row[k]) for k in PARAM_KEYS if row.get(k) is not None}
            pois = detail.get("poisoning") or {}
            for k, v in (pois.get("params") or {}).items():
                params[f"attack.{k}"] = str(v)[:500]
            mlflow.log_params(params)
            metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k != "seed" and math.isfinite(float(v))}
            if metrics:
                mlflow.log_metrics(metrics)
            for h in detail.get("history") or []:
                mlflow.log_metrics({f"epoch_{k}": float(h[k]) for k in ("loss", "acc", "val_loss", "val_acc")
                                    if k in h}, step=int(h["epoch"]))
            if row.get("error"):
                mlflow.set_tag("error", str(row["error"])[:5000])
            for rel in (detail.get("plots") or {}).values():
                if (out / rel).is_file():
                    mlflow.log_artifact(str(out / rel), artifact_path="plots")
            if detail_file.is_file():
                mlflow.log_artifact(str(detail_file))
