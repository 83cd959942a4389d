"""Run a federated poisoning experiment on Flower's simulation engine.

One Flower simulation (one Ray start-up) runs the whole grid: the ServerApp
loops over seeds x aggregators and starts one strategy per run on the same
grid of virtual clients. After every round the server evaluates the global
model on the test set (clean accuracy, macro-F1, backdoor ASR) and the
strategy's audit says which clients it excluded.

Outputs under ``OUT``: ``results.csv`` (one row per run, the centralised
runner's columns; ``defense`` is the aggregator, ``det_*`` the exclusion
precision/recall over all rounds), ``rounds.csv`` and ``rounds.json`` (one
entry per run and round), ``runs/<run>.json`` and ``plots/rounds_s<seed>.png``
(clean accuracy and ASR over rounds, one line per aggregator).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from poisonlab.data import Splits
from poisonlab.errors import ParameterError
from poisonlab.experiments.config import MethodConfig
from poisonlab.federated.client import (ClientSpec, client_data, exchanged_keys, keep_global_init, load_arrays,
                                        load_federated_data, make_client_app, malicious_ids, model_arrays, new_model,
                                        server_data_init)
from poisonlab.federated.config import FederatedConfig
from poisonlab.federated.malicious import DATA_MODES
from poisonlab.federated.partition import label_skew, partition
from poisonlab.federated.strategies import build_aggregator
from poisonlab.metrics import evaluate
from poisonlab.report.tables import BASE_COLUMNS, write_table
from poisonlab.utils import atomic_write_json, seed_everything

ROUND_COLUMNS = ["run", "aggregator", "seed", "round", "clean_acc", "macro_f1", "asr", "n_sampled",
                 "malicious_sampled", "excluded", "excl_precision", "excl_recall", "seconds"]
EXTRA_COLUMNS = ["mode", "num_clients", "n_malicious", "rounds", "partition", "alpha", "excluded_malicious",
                 "excluded_benign"]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_")[:120]


def backend_config(cfg: FederatedConfig) -> dict[str, Any]:
    """Ray settings for Flower's simulation engine.

    ``num_cpus`` caps Ray (on a shared 2-core machine: 2); each client actor
    asks for ``client_num_cpus``, so ``num_cpus / client_num_cpus`` clients
    train at once. The dashboard and driver log forwarding are off: they add
    start-up time and noise and nothing here needs them.
    """
    s = cfg.simulation
    init = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
            "num_cpus": s.num_cpus or os.cpu_count() or 1, **s.ray_init_args}
    return {"client_resources": {"num_cpus": s.client_num_cpus, "num_gpus": s.client_num_gpus},
            "init_args": init}


def _spec(cfg: FederatedConfig, data_dir: str | None, sybil_dir: str | None) -> ClientSpec:
    m = cfg.malicious
    return ClientSpec(
        dataset=cfg.dataset.model_dump(), data_dir=data_dir or cfg.dataset.data_dir, model=cfg.model.name,
        model_params=dict(cfg.model.params), training=cfg.training.model_dump(),
        num_clients=cfg.federation.num_clients, partition=cfg.federation.partition, alpha=cfg.federation.alpha,
        clients_per_round=cfg.federation.clients_per_round, num_malicious=cfg.num_malicious, mode=m.mode,
        attack=(m.attack.name, m.attack.params) if m.attack is not None else None, boost=m.boost, eta=m.eta,
        scale=m.scale, sigma=m.sigma, value=m.value, start_round=m.start_round,
        threads=max(1, int(cfg.simulation.client_num_cpus)), sybil_dir=sybil_dir,
        feature_layer=cfg.model.feature_layer)


def attack_label(cfg: FederatedConfig) -> str:
    m = cfg.malicious
    if m.mode == "none":
        return "none"
    return m.mode + (f":{m.attack.label}" if m.attack is not None and m.mode in DATA_MODES else "")


@dataclass(frozen=True)
class _Run:
    """One (seed, aggregator) run as set up before its rounds."""

    name: str
    attack: str  # the attack label in the results ("none" for the honest baseline)
    malicious: list[int]
    strategy: Any  # the audited Flower strategy
    record: Any  # the malicious clients' Poisoning (data attacks), else None


def exclusion_scores(tp: int, n_excluded: int, n_malicious: int) -> dict[str, float]:
    """``det_precision / det_recall / det_f1`` of the clients an aggregator excluded, over all rounds."""
    prec = tp / n_excluded if n_excluded else float("nan")
    rec = tp / n_malicious if n_malicious else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if n_excluded and n_malicious and prec + rec > 0 else float("nan")
    return {"det_precision": prec, "det_recall": rec, "det_f1": f1}


def round_rows(run: str, aggregator: str, seed: int, per_round: dict[int, dict[str, Any]],
               audit: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: the global model's evaluation and whom the aggregator excluded."""
    rows = []
    for rnd in sorted(per_round):
        a = audit.get(rnd, {})
        rows.append({"run": run, "aggregator": aggregator, "seed": seed, "round": rnd, **per_round[rnd],
                     "n_sampled": len(a.get("sampled", [])), "malicious_sampled": a.get("malicious_sampled", []),
                     "excluded": a.get("excluded", []), "excl_precision": a.get("excl_precision", float("nan")),
                     "excl_recall": a.get("excl_recall", float("nan"))})
    return rows


class FederatedRunner:
    """Runs one :class:`FederatedConfig` and writes results under ``out``."""

    def __init__(self, cfg: FederatedConfig, out: str | Path, data_dir: str | None = None,
                 log: Callable[[str], None] = print, verbose: bool = False):
        self.cfg, self.out, self.data_dir, self.log, self.verbose = cfg, Path(out), data_dir, log, verbose
        self.rows: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []

    # ------------------------------------------------------------ checks
    def _check(self, spec: ClientSpec) -> None:
        """Fail before Ray starts: attack parameters against each malicious partition."""
        cfg = self.cfg
        attack = None
        if cfg.malicious.attack is not None and cfg.malicious.mode in DATA_MODES:
            from poisonlab.attacks import get_attack

            attack = get_attack(cfg.malicious.attack.name, **cfg.malicious.attack.params)
        train = client_data(spec).train
        for seed in cfg.seeds:
            parts = partition(train.labels, spec.num_clients, spec.partition, spec.alpha, seed)
            if attack is not None:
                mal = malicious_ids(spec.num_clients, spec.num_malicious, seed)
                groups = [mal] if spec.mode == "sybil" else [[p] for p in mal]
                for g in groups:
                    try:
                        attack.check(train.subset(np.concatenate([parts[p] for p in g])))
                    except ParameterError as e:
                        raise ParameterError(f"malicious.attack on client(s) {g} "
                                             f"({sum(len(parts[p]) for p in g)} samples): {e}") from None

    # --------------------------------------------------------------- run
    def run(self) -> list[dict[str, Any]]:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network: Flower's telemetry would try to post
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        if not self.verbose:
            logging.getLogger("flwr").setLevel(logging.ERROR)
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", cfg.model_dump())
        sybil_dir = tempfile.mkdtemp(prefix="sybil-", dir=self.out)
        spec = _spec(cfg, self.data_dir, sybil_dir)
        data = load_federated_data(cfg.dataset, spec.data_dir)
        self._check(spec)
        n = cfg.federation.clients_per_round
        self.log(f"{cfg.name}: {data.train.name} train={len(data.train)} test={len(data.test)}, model={cfg.model.name}, "
                 f"{spec.num_clients} clients ({n} per round, {cfg.federation.partition}), "
                 f"{spec.num_malicious} malicious ({attack_label(cfg)}), {cfg.federation.rounds} rounds, "
                 f"aggregators: {', '.join(a.label for a in cfg.aggregators)}, seeds={cfg.seeds}")
        plan = [(seed, agg, False) for seed in cfg.seeds for agg in cfg.aggregators]
        if cfg.baseline:
            plan = [(seed, MethodConfig(name="fedavg"), True) for seed in cfg.seeds] + plan
        errors: list[BaseException] = []
        server = ServerApp()

        flwr = SimpleNamespace(Array=Array, ArrayRecord=ArrayRecord, ConfigRecord=ConfigRecord,
                               MetricRecord=MetricRecord)

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                for run_idx, (seed, agg, honest) in enumerate(plan):
                    self._run_one(grid, data, spec, run_idx, seed, agg, honest, flwr)
            except BaseException as e:  # re-raised in the caller's thread after the simulation stops
                errors.append(e)
                raise

        try:
            run_simulation(server_app=server, client_app=make_client_app(spec), num_supernodes=spec.num_clients,
                           backend_config=backend_config(cfg), verbose_logging=self.verbose)
        finally:
            shutil.rmtree(sybil_dir, ignore_errors=True)
        if errors:
            raise errors[0]
        self._plots()
        return self.rows

    def _run_one(self, grid: Any, data: Splits, spec: ClientSpec, run_idx: int, seed: int, agg: MethodConfig,
                 honest: bool, flwr: SimpleNamespace) -> None:
        """One (seed, aggregator) run of the federation: rounds, its row, its round rows and its JSON."""
        run = self._start_run(data, spec, seed, agg, honest)
        per_round, secs = self._rounds(grid, run, data, spec, run_idx, seed, honest, flwr)
        rounds = round_rows(run.name, agg.label, seed, per_round, run.strategy.audit)
        tp, n_ex, n_mal = (sum(run.strategy.audit.get(r, {}).get(k, 0) for r in per_round)
                           for k in ("tp", "n_excluded", "n_malicious"))
        final = per_round[max(per_round)]
        row = {"run": run.name, "dataset": self.cfg.dataset.name, "model": self.cfg.model.name,
               "attack": run.attack, "defense": agg.label, "seed": seed, "clean_acc": final["clean_acc"],
               "macro_f1": final["macro_f1"], "asr": final["asr"], **exclusion_scores(tp, n_ex, n_mal),
               "n_poisoned": len(run.record.indices) if run.record is not None else 0, "train_seconds": secs,
               "mode": "none" if honest else spec.mode, "num_clients": spec.num_clients,
               "n_malicious": 0 if honest else len(run.malicious), "rounds": self.cfg.federation.rounds,
               "partition": spec.partition, "alpha": spec.alpha if spec.partition == "dirichlet" else None,
               "excluded_malicious": tp, "excluded_benign": n_ex - tp}
        self.rows.append(row)
        self.rounds.extend(rounds)
        parts = partition(data.train.labels, spec.num_clients, spec.partition, spec.alpha, seed)
        atomic_write_json(self.out / "runs" / f"{run.name}.json", {
            "row": row, "rounds": rounds, "malicious_clients": run.malicious,
            "partition_sizes": [len(p) for p in parts], "label_skew": label_skew(data.train.labels, parts),
            "audit": {str(k): v for k, v in run.strategy.audit.items()},
            "poisoning": run.record.summary() if run.record is not None else None})
        self._write()
        asr = final["asr"]
        self.log(f"  {run.name}: clean_acc={final['clean_acc']:.4f}" + (f" asr={asr:.4f}" if asr == asr else "")
                 + f" excluded malicious {tp}/{n_mal}, benign {n_ex - tp} ({secs:.1f}s)")

    def _start_run(self, data: Splits, spec: ClientSpec, seed: int, agg: MethodConfig, honest: bool) -> _Run:
        """The run's malicious clients, its aggregator (a Flower strategy) and the poisoning they use."""
        cfg = self.cfg
        mal = malicious_ids(spec.num_clients, spec.num_malicious, seed)
        attack = "none" if honest else attack_label(cfg)
        strategy = build_aggregator(agg.name, agg.params, n=cfg.federation.clients_per_round,
                                    num_clients=spec.num_clients, fraction_fit=cfg.federation.fraction_fit,
                                    malicious=() if honest else mal)
        record = None
        if spec.mode in DATA_MODES and spec.attack is not None:
            from poisonlab.federated.client import poisoned_set

            group = tuple(mal) if spec.mode == "sybil" else (mal[0],)
            record = poisoned_set(spec, seed, group)[1]
        return _Run(_slug(f"{agg.label}-{attack}-s{seed}"), attack, mal, strategy, record)

    def _rounds(self, grid: Any, run: _Run, data: Splits, spec: ClientSpec, run_idx: int, seed: int, honest: bool,
                flwr: SimpleNamespace) -> tuple[dict[int, dict[str, Any]], float]:
        """Run the strategy for every round; returns the global model's evaluation per round and the
        seconds spent outside evaluation (training and aggregation)."""
        seed_everything(seed)
        random.seed(seed)  # Flower samples the round's clients with the random module
        model = new_model(spec, data.train)
        server_data_init(model, data.train, seed)
        initial = flwr.ArrayRecord({k: flwr.Array(v) for k, v in model_arrays(model, exchanged_keys(model)).items()})
        eval_model = new_model(spec, data.train)
        keep_global_init(eval_model)
        per_round: dict[int, dict[str, Any]] = {}
        clock = {"t": time.perf_counter(), "eval": 0.0}

        def evaluate_fn(rnd: int, arrays: Any) -> Any:
            t0 = time.perf_counter()
            errs = getattr(run.strategy, "errors", {})
            if rnd in errs:
                raise RuntimeError(f"{run.name}: client failure in round {rnd}: {errs[rnd][0]}")
            load_arrays(eval_model, dict(zip(arrays.keys(), arrays.to_numpy_ndarrays())))
            m = evaluate(eval_model, data.test, run.record)
            per_round[rnd] = {"clean_acc": m["clean_acc"], "macro_f1": m["macro_f1"], "asr": m["asr"],
                              "seconds": t0 - clock["t"] - clock["eval"]}
            clock["eval"] += time.perf_counter() - t0
            return flwr.MetricRecord({"clean_acc": float(m["clean_acc"]),
                                      "asr": float(np.nan_to_num(m["asr"], nan=-1))})

        train_config = flwr.ConfigRecord({"seed": int(seed), "run": int(run_idx), "honest": int(honest)})
        run.strategy.start(grid=grid, initial_arrays=initial, num_rounds=self.cfg.federation.rounds,
                           train_config=train_config, evaluate_fn=evaluate_fn)
        return per_round, time.perf_counter() - clock["t"] - clock["eval"]

    # ------------------------------------------------------------ output
    def _write(self) -> None:
        write_table(self.out, "results", self.rows, BASE_COLUMNS + EXTRA_COLUMNS)
        write_table(self.out, "rounds", self.rounds, ROUND_COLUMNS)

    def _plots(self) -> None:
        if not self.cfg.plots or not self.rounds:
            return
        from poisonlab.federated.plots import plot_rounds

        for seed in self.cfg.seeds:
            rows = [dict(r, aggregator=f"{r['aggregator']} (all honest)" if r["run"].endswith(f"-none-s{seed}")
                         else r["aggregator"]) for r in self.rounds if r["seed"] == seed]
            plot_rounds(rows, self.out / "plots" / f"rounds_s{seed}.png",
                        f"{self.cfg.name}: {attack_label(self.cfg)}, seed {seed}")


def run_federated(cfg: FederatedConfig, out: str | Path, data_dir: str | None = None,
                  log: Callable[[str], None] = print, verbose: bool = False) -> list[dict[str, Any]]:
    """Run ``cfg`` on Flower's simulation engine; write results under ``out``; return the result rows."""
    return FederatedRunner(cfg, out, data_dir, log, verbose).run()
