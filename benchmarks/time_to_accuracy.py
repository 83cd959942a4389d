"""Time to accuracy on full CIFAR-10 with the fast default net and recipe.

Trains ``fastnet`` on the 50,000 training images and measures test accuracy
(with flip test-time augmentation) after every epoch; prints the cumulative
training time (evaluation excluded) at which 85% and 90% were first reached.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --epochs 10

The recipe below is the default fast recipe documented in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from poisonlab.data import load_dataset
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit, predict_proba

FAST_RECIPE = dict(batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
                   label_smoothing=0.2, schedule="onecycle", warmup_fraction=0.15, crop_padding=2, flip=True,
                   channels_last=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--n", type=int, default=50000, help="training images (stratified subset)")
    ap.add_argument("--lr", type=float, default=FAST_RECIPE["lr"])
    ap.add_argument("--batch-size", type=int, default=FAST_RECIPE["batch_size"])
    ap.add_argument("--test-size", type=int, default=10000, help="evaluate on a stratified subset (tuning)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", default="", help="write the JSON result here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    if args.n < len(train):
        train = train.stratified_subset(args.n, seed=0)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    if args.test_size < len(test):
        test = test.stratified_subset(args.test_size, seed=0)
    mean, std = train.channel_stats()
    widths = tuple(int(w) for w in args.widths.split(","))
    torch.manual_seed(0)
    model = build_model("fastnet", 3, 10, 32, mean=mean, std=std, widths=widths)
    recipe = dict(FAST_RECIPE, lr=args.lr, batch_size=args.batch_size, bf16=args.bf16)
    results = []
    train_time = 0.0
    cfg = TrainConfig(epochs=args.epochs, **recipe)

    def on_epoch(rec: dict, m: torch.nn.Module) -> None:
        nonlocal train_time
        train_time += rec["seconds"]
        t0 = time.perf_counter()
        acc = float((predict_proba(m, test, tta_flip=True).argmax(1) == test.labels).mean())
        m.train()
        results.append({"epoch": rec["epoch"], "train_seconds": round(train_time, 1), "test_acc": acc,
                        "train_acc": rec["acc"], "eval_seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(results[-1]), flush=True)

    fit(model, train, cfg, seed=0, epoch_callback=on_epoch)
    first = {f"seconds_to_{int(t * 100)}": next((r["train_seconds"] for r in results if r["test_acc"] >= t), None)
             for t in (0.85, 0.90)}
    out = {"widths": widths, "epochs": args.epochs, "recipe": recipe, "threads": torch.get_num_threads(),
           "final_test_acc": results[-1]["test_acc"], **first, "per_epoch": results,
           "load_average": os.getloadavg(), "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    if args.out:
        from poisonlab.utils import atomic_write_json

        atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
