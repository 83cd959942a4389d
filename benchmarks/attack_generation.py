"""Time the optimisation attacks of the clean-label/gradient family on CIFAR-10 and
measure the targeted ones' success over several targets.

Two parts, run by hand (not in CI):

  timing   generation time of classwise_random, error_minimizing, fgsm,
           gradient_matching and feature_collision with their defaults on the
           CIFAR-10 training set (``--n-train``, default all 50,000); the clean
           surrogate's training time is reported separately.
  success  target success of gradient_matching (victim trained from scratch on
           the poisoned set) and feature_collision (victim = surrogate with its
           body frozen and head retrained), one poisoning per target, on a
           stratified ``--success-train`` subset.

    python benchmarks/attack_generation.py --part timing --out /tmp/gen_timing.json
    python benchmarks/attack_generation.py --part success --targets 3 --out /tmp/gen_success.json

Prints one JSON line per measurement and writes all of them to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch


def _log(rows: list[dict], row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def _surrogate(train, epochs: int, seed: int):
    from poisonlab import TrainConfig, build_model, fit
    from poisonlab.data.imageset import channel_stats

    h, _, c = train.shape
    m = build_model("fastnet", c, train.num_classes, h, *channel_stats(train.images))
    t0 = time.perf_counter()
    fit(m, train, TrainConfig(epochs=epochs, batch_size=256, lr=0.05, crop_padding=2, flip=True), seed=seed)
    return m, time.perf_counter() - t0


def timing(args, rows: list[dict]) -> None:
    from poisonlab import get_attack, load_dataset
    from poisonlab.attacks import AttackContext
    from poisonlab.metrics import evaluate

    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    if args.n_train < len(train):
        train = train.stratified_subset(args.n_train, seed=0)
    base = {"part": "timing", "n_train": len(train)}
    for name in ("classwise_random", "error_minimizing"):
        if name not in args.attacks:
            continue
        c0 = time.process_time()
        _, rec = get_attack(name).poison(train, seed=0)
        _log(rows, base | {"attack": name, "seconds": round(rec.seconds, 1), "cpu_seconds": round(time.process_time() - c0, 1),
                           "n_poisoned": len(rec.indices),
                           **{k: v for k, v in rec.extra.items() if k in ("rounds", "surrogate_acc_on_perturbed",
                                                                          "stopped", "acc_per_round")}})
    needs = [a for a in ("fgsm", "gradient_matching", "feature_collision") if a in args.attacks]
    if not needs:
        return
    sur_train = train if args.surrogate_train >= len(train) else train.stratified_subset(args.surrogate_train, 0)
    model, secs = _surrogate(sur_train, args.surrogate_epochs, 0)
    acc = evaluate(model, test)["clean_acc"]
    _log(rows, base | {"attack": "surrogate(fastnet)", "seconds": round(secs, 1), "train_size": len(sur_train),
                       "epochs": args.surrogate_epochs, "clean_acc": round(acc, 4)})
    ctx = AttackContext(test=test, clean_model=model)
    for name in needs:
        c0 = time.process_time()
        _, rec = get_attack(name).poison(train, seed=0, context=ctx)
        extra = {k: v for k, v in rec.extra.items() if not isinstance(v, list)}
        _log(rows, base | {"attack": name, "seconds": round(rec.seconds, 1),
                           "cpu_seconds": round(time.process_time() - c0, 1), "n_poisoned": len(rec.indices), **extra})


def success(args, rows: list[dict]) -> None:
    from poisonlab import TrainConfig, build_model, fit, get_attack, load_dataset
    from poisonlab.attacks import AttackContext
    from poisonlab.data.imageset import channel_stats
    from poisonlab.training import predict_proba

    train = load_dataset("cifar10", "train", data_dir=args.data_dir).stratified_subset(args.success_train, seed=0)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    model, secs = _surrogate(train, args.victim_epochs, 0)
    _log(rows, {"part": "success", "attack": "surrogate(fastnet)", "seconds": round(secs, 1), "n_train": len(train)})
    ctx = AttackContext(test=test, clean_model=model)
    recipe = TrainConfig(epochs=args.victim_epochs, batch_size=256, lr=0.05, crop_padding=2, flip=True)
    for name in args.attacks:
        if name not in ("gradient_matching", "feature_collision"):
            continue
        wins = []
        for t in range(args.targets):
            params = {"steps": args.gm_steps, "restarts": args.gm_restarts} if name == "gradient_matching" else {}
            if name == "gradient_matching":
                params["budget"] = args.gm_budget
            poisoned, rec = get_attack(name, **params).poison(train, seed=100 + t, context=ctx)
            t0 = time.perf_counter()
            if name == "gradient_matching":  # victim from scratch, a different initialisation than the surrogate
                h, _, c = train.shape
                victim = build_model("fastnet", c, train.num_classes, h, *channel_stats(train.images))
                fit(victim, poisoned, recipe, seed=1)
            else:
                victim = copy.deepcopy(model)
                fit(victim, poisoned, recipe.model_copy(update={"lr": 0.2}), seed=1, freeze_body=True)
            vsecs = time.perf_counter() - t0
            ti, adv = rec.target_indices, int(rec.adversarial_labels[0])
            pv = predict_proba(victim, test.images[ti])[0]
            pc = predict_proba(model, test.images[ti])[0]
            win = bool(pv.argmax() == adv)
            wins.append(win)
            _log(rows, {"part": "success", "attack": name, "target": int(ti[0]), "target_class": int(test.labels[ti[0]]),
                        "adversarial_class": adv, "n_poisoned": len(rec.indices), "poison_seconds": round(rec.seconds, 1),
                        "victim_seconds": round(vsecs, 1), "p_adv_surrogate": round(float(pc[adv]), 4),
                        "p_adv_victim": round(float(pv[adv]), 4), "success": win,
                        **{k: v for k, v in rec.extra.items() if not isinstance(v, list)}})
        _log(rows, {"part": "success", "attack": name, "targets": len(wins), "target_success": float(np.mean(wins))})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("timing", "success"), default="timing")
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--attacks", nargs="+", default=["classwise_random", "error_minimizing", "fgsm",
                                                     "gradient_matching", "feature_collision"])
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--surrogate-train", type=int, default=50_000, help="timing: images the surrogate is trained on")
    ap.add_argument("--surrogate-epochs", type=int, default=2)
    ap.add_argument("--success-train", type=int, default=5000)
    ap.add_argument("--victim-epochs", type=int, default=4)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--gm-steps", type=int, default=30)
    ap.add_argument("--gm-restarts", type=int, default=1)
    ap.add_argument("--gm-budget", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    _log(rows, {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads": args.threads, "load_at_start": os.getloadavg(), "argv": sys.argv[1:]})
    (timing if args.part == "timing" else success)(args, rows)
    rows.append({"load_at_end": os.getloadavg()})
    if args.out:
        from poisonlab.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
