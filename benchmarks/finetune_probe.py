"""Why plain fine-tuning (FT) leaves BadNets in the BackdoorBench table's victim: a small probe.

Takes one poisoned victim from a BackdoorBench run's cache (``benchmarks/backdoorbench.py``), rebuilds its
poisoning (the attack and parameters its ``meta.json`` records) and trusted clean set exactly as the
runner does (seed, ``clean_fraction``), and
fine-tunes copies of it with and without the fine-tune augmentation (random crop 4 + flip) at a few
learning rates for a few epochs; prints clean accuracy and ASR on the first ``--n-test`` test images
(no test-time augmentation, so the figures sit a little below the table's).

    python benchmarks/finetune_probe.py --model runs/backdoorbench/cache/victim/<key>/model.pt \\
        --data-dir ../shared/data noaug,0.01,10 aug,0.01,10 aug,0.1,10 noaug,0.1,10

Each argument is ``aug|noaug,LR,EPOCHS``; SGD momentum 0.9, weight decay 5e-4, cosine, batch 256, as
BackdoorBench's FT. The victim's key is in the run's ``runs/*.json`` (``victim_key``) or its meta.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from poisonlab.attacks import get_attack
from poisonlab.errors import PoisonlabError
from poisonlab.data import load_dataset
from poisonlab.metrics import evaluate
from poisonlab.models import build_model_for
from poisonlab.training.loop import TrainConfig, fit
from poisonlab.utils import load_state_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model.pt of a cached airnet victim (its meta.json beside it)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (poison indices, trusted set)")
    ap.add_argument("--clean-fraction", type=float, default=0.05)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("runs", nargs="+", help="aug|noaug,LR,EPOCHS")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    attack = victim_attack(Path(args.model).parent / "meta.json")
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir).subset(np.arange(args.n_test))
    victim, _, poisoning, trusted = rebuild_victim(attack, args.model, train, args.seed, args.clean_fraction)
    m = evaluate(victim, test, poisoning)
    print(f"victim of {attack.registry_name}{attack.params()}")
    print(f"victim: clean {m['clean_acc']:.4f}  ASR {m['asr']:.4f}  (first {len(test)} test images, no TTA)")
    for spec in args.runs:
        aug, lr, epochs = spec.split(",")
        if aug not in ("aug", "noaug"):
            raise SystemExit(f"run {spec!r}: the first field must be aug or noaug")
        tuned = copy.deepcopy(victim)
        cfg = TrainConfig(epochs=int(epochs), lr=float(lr), batch_size=256, schedule="cosine", warmup_fraction=0.0,
                          crop_padding=4 if aug == "aug" else 0, flip=aug == "aug")
        t = time.perf_counter()
        hist = fit(tuned, trusted, cfg, seed=args.seed)
        m = evaluate(tuned, test, poisoning)
        print(f"{aug:5s} lr {float(lr):<5g} {int(epochs):3d} epochs: loss {hist[-1]['loss']:.3f}  "
              f"clean {m['clean_acc']:.4f}  ASR {m['asr']:.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)


def rebuild_victim(attack, model_file: str | Path, train, seed: int, clean_fraction: float):
    """``(victim, poisoned, poisoning, trusted)`` of a cached airnet victim: its weights from ``model_file``,
    ``attack`` (:func:`victim_attack`) applied to ``train`` with the run's ``seed``, and the trusted set drawn
    as the runner draws it (``clean_fraction`` of ``train``, none of it poisoned, stratified with ``seed``)."""
    poisoned, poisoning = attack.poison(train, seed=seed)
    clean_idx = np.setdiff1d(np.arange(len(train)), poisoning.indices)
    trusted = train.subset(clean_idx).stratified_subset(int(clean_fraction * len(train)), seed=seed)
    victim = build_model_for("airnet", train)
    victim.load_state_dict(load_state_dict(model_file))
    return victim.eval(), poisoned, poisoning, trusted


def victim_attack(meta_file: Path):
    """The attack a cached victim was poisoned with, from its ``meta.json`` (``poisoning``: attack and params)."""
    try:
        summary = json.loads(meta_file.read_text())["poisoning"]
        return get_attack(summary["attack"], **summary["params"])
    except (OSError, ValueError, KeyError, TypeError, PoisonlabError) as e:
        raise SystemExit(f"{meta_file}: not a cached victim's meta.json with poisoning.attack and .params ({e})")


if __name__ == "__main__":
    main()
