"""What each piece of the airbench recipe is worth here: one change at a time, on full CIFAR-10.

Every variant is the base preset (default ``airbench_quick``: ``airnet`` 32-64-128, 4 epochs, about
2 minutes a run on a 2-core CPU) with one piece removed or changed; each runs for ``--seeds`` seeds
and the table reports the final test accuracy without test-time augmentation (TTA variants are read
off the base runs' final models, which the benchmark evaluates under every TTA) and the training time.

    python benchmarks/recipe_ablation.py --data-dir ../shared/data --seeds 0,1 --out docs/perf-logs/recipe_ablation.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
from pathlib import Path

import torch

# (name, TrainConfig overrides, model-parameter overrides); batch-size variants keep airbench's
# weight decay per example (2e-6 x batch size)
VARIANTS: list[tuple[str, dict, dict]] = [
    ("base", {}, {}),
    ("no label smoothing", {"label_smoothing": 0.0}, {}),
    ("random flip (not alternating)", {"flip_mode": "random"}, {}),
    ("momentum without Nesterov", {"nesterov": False}, {}),
    ("biases and head at one lr (0.67)", {"bias_lr": 0.67, "head_lr": 0.67}, {}),
    ("stem bias trained throughout", {"stem_bias_epochs": None}, {}),
    ("whitening stem trainable", {}, {"train_stem": True}),
    ("batch norm with a learnable scale", {}, {"bn_scale": True}),
    ("SGD instead of Muon (lr 0.1 mean loss, wd 5e-4)",
     {"optimizer": "sgd", "lr": 0.1, "bias_lr": 0.1, "head_lr": 0.1, "loss_reduction": "mean",
      "weight_decay": 5e-4, "momentum": 0.9}, {}),
    ("batch 500", {"batch_size": 500, "weight_decay": 2e-6 * 500}, {}),
    ("batch 2000", {"batch_size": 2000, "micro_batch_size": 250, "weight_decay": 2e-6 * 2000}, {}),
]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("time_to_accuracy", Path(__file__).with_name("time_to_accuracy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--preset", default="airbench_quick")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--only", nargs="*", help="run only the variants whose names start with these")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = load_benchmark()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name, over, model_over in VARIANTS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        runs = [bench.run(args.data_dir, args.preset, overrides=over, model_params=model_over, seed=s, target=1.0,
                          log=lambda _: None) for s in seeds]
        accs = [r["final_test_acc_no_tta"] for r in runs]
        row = {"variant": name, "overrides": over, "model_params": model_over, "seeds": seeds,
               "acc_no_tta": accs, "mean_no_tta": statistics.mean(accs),
               "by_tta": [r["final_test_acc_by_tta"] for r in runs],
               "train_seconds": [r["train_seconds"] for r in runs], "mfu": [r["mfu"] for r in runs],
               "load_average": [r["load_average_after"] for r in runs]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        from poisonlab.utils import atomic_write_json

        atomic_write_json(args.out, {"preset": args.preset, "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
