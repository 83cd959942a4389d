"""Time the label-consistent backdoor's poison generation on the full CIFAR-10 training set.

Trains a fastnet surrogate quickly (its time is reported separately), then runs
``label_consistent`` with its CIFAR-10 defaults (rate 0.5 of the target class =
2,500 images, L-inf PGD eps 8/255, 10 steps of 2/255) on all 50,000 training
images and prints one JSON object: generation seconds, surrogate seconds and
accuracy, how many poisons the PGD pushed off their class, stealth figures,
and the machine's load average (other jobs may share the CPU).

    python benchmarks/attack_generation_lc.py --data-dir ../shared/data
    python benchmarks/attack_generation_lc.py --surrogate-train-size 10000 --surrogate-epochs 2 --evaluate

``--surrogate-train-size`` trains the surrogate on a stratified subset (to save
time on a busy machine); the attack itself always runs on the full training
set unless ``--attack-train-size`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return (float("nan"),) * 3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--surrogate-epochs", type=int, default=3)
    ap.add_argument("--surrogate-train-size", type=int, default=0, help="0 = all 50,000")
    ap.add_argument("--attack-train-size", type=int, default=0, help="0 = all 50,000")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-size", type=float, default=2 / 255)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--evaluate", action="store_true", help="also train a victim on the poisoned set (slow)")
    ap.add_argument("--victim-epochs", type=int, default=5)
    ap.add_argument("--json-out", default="", help="also write the result JSON here")
    args = ap.parse_args(argv)

    from poisonlab.attacks import AttackContext, get_attack
    from poisonlab.attacks.stealth import stealth_metrics
    from poisonlab.data import load_dataset
    from poisonlab.metrics import evaluate
    from poisonlab.models import build_model
    from poisonlab.training import TrainConfig, fit

    torch.set_num_threads(args.threads)
    load_before = _load()
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    attack_train = (train.stratified_subset(args.attack_train_size, seed=0)
                    if args.attack_train_size and args.attack_train_size < len(train) else train)
    sur_train = (train.stratified_subset(args.surrogate_train_size, seed=0)
                 if args.surrogate_train_size and args.surrogate_train_size < len(train) else train)
    mean, std = train.channel_stats()
    recipe = TrainConfig(epochs=args.surrogate_epochs, batch_size=256, lr=0.05, crop_padding=2, flip=True)

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("fastnet", 3, 10, 32, mean=mean, std=std)

    t0 = time.perf_counter()
    surrogate = make()
    fit(surrogate, sur_train, recipe, seed=0)
    sur_secs = time.perf_counter() - t0
    sur_acc = evaluate(surrogate, test)["clean_acc"]
    print(f"surrogate: {sur_secs:.1f}s, test acc {sur_acc:.4f}", file=sys.stderr)

    attack = get_attack("label_consistent", rate=args.rate, target=args.target, eps=args.eps, steps=args.steps,
                        step_size=args.step_size, batch_size=args.batch_size)
    t0 = time.perf_counter()
    poisoned, record = attack.poison(attack_train, seed=0, context=AttackContext(test=test, clean_model=surrogate))
    wall = time.perf_counter() - t0
    print(f"label_consistent: {record.seconds:.1f}s for {len(record.indices)} poisons", file=sys.stderr)
    stealth = stealth_metrics(attack_train.images, poisoned.images, attack_train.labels, poisoned.labels,
                              record.indices)
    out = {
        "benchmark": "attack_generation_lc",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "loadavg_before": load_before, "loadavg_after": _load()},
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "attack_params": record.params,
        "attack_train_size": len(attack_train),
        "n_poisoned": int(len(record.indices)),
        "generation_seconds": round(record.seconds, 2),
        "generation_wall_seconds": round(wall, 2),
        "surrogate": {"model": "fastnet", "train_size": len(sur_train), "epochs": args.surrogate_epochs,
                      "seconds": round(sur_secs, 2), "test_acc": round(sur_acc, 4)},
        "pgd_fooled": record.extra["pgd_fooled"], "clean_fooled": record.extra["clean_fooled"],
        "stealth": stealth,
    }
    if args.evaluate:
        t0 = time.perf_counter()
        victim = make()
        fit(victim, poisoned, recipe.model_copy(update={"epochs": args.victim_epochs}), seed=1)
        m = evaluate(victim, test, record)
        out["victim"] = {"epochs": args.victim_epochs, "seconds": round(time.perf_counter() - t0, 2),
                         "clean_acc": m["clean_acc"], "asr": m["asr"], "robust_acc": m["robust_acc"]}
    text = json.dumps(out, indent=2, default=float)
    print(text)
    if args.json_out:
        from poisonlab.utils import atomic_write_text

        atomic_write_text(args.json_out, text)
    return out


if __name__ == "__main__":
    main()
