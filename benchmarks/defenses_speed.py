"""Speed of STRIP (scoring the CIFAR-10 test set) and Neural Cleanse (10 classes) with the fast default net.

A BadNets fastnet is trained on a CIFAR-10 subset first (its time is reported
but is not part of either figure). Prints a JSON record.

    python benchmarks/defenses_speed.py --train-size 10000 --epochs 8 --strip-images 10000 --nc-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from poisonlab.attacks import get_attack
from poisonlab.data import load_dataset
from poisonlab.defenses.neural_cleanse import mad_anomaly_index, reverse_engineer_triggers
from poisonlab.defenses.strip import strip_entropy
from poisonlab.metrics import evaluate
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--train-size", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--strip-images", type=int, default=10_000)
    ap.add_argument("--strip-n", type=int, default=20)
    ap.add_argument("--strip-batch", type=int, default=64)
    ap.add_argument("--nc-steps", type=int, default=300)
    ap.add_argument("--nc-batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                    help="STRIP's bfloat16 autocast (auto: where the device has fast bf16)")
    ap.add_argument("--skip-nc", action="store_true", help="time STRIP only")
    ap.add_argument("--widths", default=None,
                    help="fastnet widths, e.g. 32,64,128 (the quick-run net); default: the registry's (64,128,256)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tr = load_dataset("cifar10", "train", data_dir=a.data_dir).stratified_subset(a.train_size, seed=0)
    te = load_dataset("cifar10", "test", data_dir=a.data_dir)
    poisoned, rec = get_attack("badnets", rate=0.06, size=3, intensity=1.0).poison(tr, seed=0)
    clean_idx = np.setdiff1d(np.arange(len(tr)), rec.indices)
    clean = tr.subset(clean_idx).stratified_subset(max(500, len(tr) // 20), seed=0)
    torch.manual_seed(0)
    widths = {"widths": tuple(int(w) for w in a.widths.split(","))} if a.widths else {}
    model = build_model("fastnet", 3, 10, 32, **widths).to(a.device)
    t0 = time.perf_counter()
    fit(model, poisoned, TrainConfig(epochs=a.epochs, batch_size=256), device=a.device)
    train_s = time.perf_counter() - t0
    ev = evaluate(model, te, rec)

    bf16 = {"auto": None, "on": True, "off": False}[a.bf16]
    imgs = te.images[: a.strip_images]
    pool = clean.float_tensor(a.device)
    strip_entropy(model, imgs[:64], pool, n=a.strip_n, batch_size=a.strip_batch, bf16=bf16)  # warm-up
    t0 = time.perf_counter()
    ent_clean = strip_entropy(model, imgs, pool, n=a.strip_n, batch_size=a.strip_batch, bf16=bf16)
    strip_s = time.perf_counter() - t0
    keep = te.labels[: a.strip_images] != rec.target_class
    ent_trig = strip_entropy(model, rec.apply_trigger(imgs[keep]), pool, n=a.strip_n, batch_size=a.strip_batch,
                             bf16=bf16)
    thr = float(np.quantile(ent_clean, 0.01))  # threshold at 1% FRR on the clean test images themselves

    nc = None
    if not a.skip_nc:
        t0 = time.perf_counter()
        rev = reverse_engineer_triggers(model, clean.float_tensor(a.device), 10, steps=a.nc_steps,
                                        batch_size=a.nc_batch)
        nc_s = time.perf_counter() - t0
        idx = mad_anomaly_index(rev.l1)
        nc = {"classes": 10, "steps": a.nc_steps, "batch": a.nc_batch, "seconds": round(nc_s, 1),
              "mask_l1": np.round(rev.l1, 1).tolist(), "anomaly_index": np.round(idx, 2).tolist(),
              "target": rec.target_class, "flagged": np.nonzero((idx > 2) & (rev.l1 < np.median(rev.l1)))[0].tolist()}
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {a.device}",
        "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
        "model": f"fastnet{widths.get('widths', '(registry default widths)')}",
        "train_size": a.train_size, "epochs": a.epochs, "train_seconds": round(train_s, 1),
        "clean_acc": round(ev["clean_acc"], 4), "asr": round(ev["asr"], 4),
        "strip": {"images": len(imgs), "n": a.strip_n, "bf16": a.bf16, "seconds": round(strip_s, 1),
                  "images_per_second": round(len(imgs) / strip_s, 1),
                  "far_at_1pct_frr": round(float((ent_trig >= thr).mean()), 4),
                  "entropy_clean_mean": round(float(ent_clean.mean()), 4),
                  "entropy_triggered_mean": round(float(ent_trig.mean()), 4)},
        "neural_cleanse": nc,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
