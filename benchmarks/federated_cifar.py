"""Federated poisoning benchmark on CIFAR-10 (Flower simulation): every aggregator under attack.

Default: examples/federated_benchmark.toml (20 clients, 20% malicious, 30 rounds).
Prints one line per run and a JSON summary; writes results.csv, rounds.csv and the plot to --out.

    python benchmarks/federated_cifar.py --data-dir ../shared/data --out runs/fl-bench
    python benchmarks/federated_cifar.py --rounds 5 --train-size 2000 --aggregators fedavg median   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples" / "federated_benchmark.toml"))
    ap.add_argument("--out", default="runs/federated-benchmark")
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--rounds", type=int, help="override federation.rounds")
    ap.add_argument("--clients", type=int, help="override federation.num_clients")
    ap.add_argument("--train-size", type=int, help="override dataset.train_size")
    ap.add_argument("--test-size", type=int, help="override dataset.test_size")
    ap.add_argument("--mode", help="override malicious.mode")
    ap.add_argument("--aggregators", nargs="+", help="keep only these aggregator names")
    ap.add_argument("--num-cpus", type=int, help="override simulation.num_cpus")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    import tomllib

    from poisonlab.federated.config import parse_federated_config
    from poisonlab.federated.simulation import run_federated

    data = tomllib.loads(Path(args.config).read_text())
    if args.rounds:
        data["federation"]["rounds"] = args.rounds
    if args.clients:
        data["federation"]["num_clients"] = args.clients
    if args.train_size:
        data["dataset"]["train_size"] = args.train_size
    if args.test_size:
        data["dataset"]["test_size"] = args.test_size
    if args.mode:
        data["malicious"]["mode"] = args.mode
    if args.aggregators:
        data["aggregators"] = [a for a in data["aggregators"] if a["name"] in args.aggregators]
    if args.num_cpus:
        data.setdefault("simulation", {})["num_cpus"] = args.num_cpus
    if args.no_baseline:
        data["baseline"] = False
    cfg = parse_federated_config(data, args.config)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = run_federated(cfg, args.out, args.data_dir, log=print)
    wall = time.perf_counter() - t0
    keep = ("attack", "defense", "clean_acc", "macro_f1", "asr", "det_precision", "det_recall",
            "excluded_malicious", "excluded_benign", "train_seconds")
    summary = {"config": args.config, "rounds": cfg.federation.rounds, "clients": cfg.federation.num_clients,
               "malicious": cfg.num_malicious, "train_size": cfg.dataset.train_size, "model": cfg.model.name,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "loadavg_start": load0, "loadavg_end": os.getloadavg(), "wall_seconds": wall,
               "runs": [{k: r.get(k) for k in keep} for r in rows]}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
