"""Time every data filter on the penultimate features of the 50,000 CIFAR-10 training images.

The features are computed once (a ``fastnet`` trained ``--epochs`` on ``--train-images``
images, then applied to all 50,000; the filters only see the features, so the
feature quality barely affects their speed). Confident learning and loss
outliers are given fixed probabilities (the model's own, standing in for the
k-fold ones, whose training cost is the runner's, not the filter's).
Prints one line per filter (seconds, peak RSS) and a JSON summary.

    python benchmarks/filters_speed.py --data-dir ../shared/data

Issue target: all filters together under 30 s, memory under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import torch

from poisonlab.data import load_dataset
from poisonlab.defenses import DefenseContext, get_defense
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, extract_features, fit, predict_proba

FILTERS = ["loss_outliers", "activation_clustering", "kmeans_vote", "spectral_signatures", "pca_outliers",
           "kmeans_outliers", "pca_kmeans", "influence", "gradient_similarity", "confident_learning", "isolation_forest",
           "activation_clustering+whiten"]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--train-images", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    if args.n < len(train):
        train = train.stratified_subset(args.n, seed=0)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir).stratified_subset(1000, seed=0)
    t0 = time.perf_counter()
    model = build_model("fastnet", 3, 10, 32)
    fit(model, train.stratified_subset(args.train_images, seed=0), TrainConfig(epochs=args.epochs, batch_size=256,
                                                                              lr=0.1, flip=True))
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = extract_features(model, train)
    probs = predict_proba(model, train)
    t_feat = time.perf_counter() - t0
    print(f"features {feats.shape} in {t_feat:.1f} s (model trained in {t_train:.1f} s); RSS {rss_gb():.2f} GB")

    def train_model(*a, **k):  # the filters timed here never retrain
        raise RuntimeError("not used")

    ctx = DefenseContext(train=train, model=model, test=test, train_model=train_model, seed=0)
    ctx.cache["features"] = feats
    ctx.cache["pred_probs"] = probs
    ctx.cache["cv_pred_probs_5"] = probs
    params = {"influence": {"test_indices": 0}, "gradient_similarity": {"target_index": 0, "adversarial_class": 5},
              "activation_clustering+whiten": {"whiten": True}}
    times = {}
    total = 0.0
    for name in FILTERS:
        t0 = time.perf_counter()
        out = get_defense(name.split("+")[0], **params.get(name, {})).score(ctx)
        dt = time.perf_counter() - t0
        total += dt
        times[name] = round(dt, 2)
        print(f"{name:22s} {dt:7.2f} s  flagged {int(np.sum(out.flagged)):6d}  peak RSS {rss_gb():.2f} GB")
    print(f"{'total':22s} {total:7.2f} s  (activation_clustering+whiten is the audit's variant, an alternative "
          "to activation_clustering)")
    print(json.dumps({"n": len(train), "dim": int(feats.shape[1]), "seconds": times, "total_seconds": round(total, 2),
                      "peak_rss_gb": round(rss_gb(), 2), "threads": torch.get_num_threads(),
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
