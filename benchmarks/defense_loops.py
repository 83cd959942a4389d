"""The BackdoorBench defences' own loops on the table's airnet victim: their speed per precision, and
whether ABL's from-scratch training learns airnet at a given learning rate (docs/BACKDOORBENCH.md).

    python benchmarks/defense_loops.py speed --model runs/backdoorbench/cache/victim/<key>/model.pt \\
        --data-dir ../shared/data
    python benchmarks/defense_loops.py abl_lr --model runs/backdoorbench/cache/victim/<key>/model.pt \\
        --data-dir ../shared/data --lrs 0.01 0.1 1.0

``--model`` is a cached airnet victim (its ``meta.json`` beside it: the poisoning is rebuilt from it, and
the trusted set as the runner draws it: ``--seed``, 5% clean data).

``speed`` runs a short budget of each defence's own optimisation loop (FT-SAM: one epoch of SAM steps
on the trusted set; NC: trigger reverse-engineering steps; ANP: mask steps; NAD: one distillation
epoch after a one-epoch teacher; ABL: one isolation epoch on ``--abl-images`` poisoned images) twice:
under the training's precision rule (bf16 autocast on a CPU with bf16 units) and in float32 (the rule
told the CPU has none), and prints seconds per unit and the ratio.

``abl_lr`` trains airnet from scratch with ABL's isolation loop (SGD, Nesterov 0.9, weight decay 1e-4,
batch 256, flooding at 0.5) for ``--epochs`` epochs at each learning rate and prints the last batch's
loss, clean accuracy and ASR on the first ``--n-test`` test images, and the precision of the 1% it
would isolate: whether ABL at that learning rate trains this victim at all.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from poisonlab.data import load_dataset
from poisonlab.defenses import DefenseContext, get_defense
from poisonlab.errors import PoisonlabError
from poisonlab.metrics import evaluate
from poisonlab.models import build_model_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_probe import rebuild_victim, victim_attack  # noqa: E402  (a sibling script)

# defence, parameters of a short run, the unit its budget counts, units in that budget
SPEED_RUNS = [
    ("ft_sam", {"epochs": 1}, "epoch of 2,500 images", 1),
    ("neural_cleanse", {"steps": 30, "epochs": 1}, "reverse step", 30),
    ("anp", {"iterations": 30}, "mask step", 30),
    ("nad", {"teacher_epochs": 1, "epochs": 1}, "teacher + student epoch", 1),
    ("abl", {"isolation_epochs": 1, "finetune_epochs": 0, "unlearning_epochs": 0}, "isolation epoch", 1),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["speed", "abl_lr"])
    ap.add_argument("--model", required=True, help="model.pt of a cached airnet victim (its meta.json beside it)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (poison indices, trusted set)")
    ap.add_argument("--abl-images", type=int, default=10_000, help="speed: poisoned images of ABL's isolation epoch")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="abl_lr: learning rates")
    ap.add_argument("--epochs", type=int, default=2, help="abl_lr: isolation epochs at each learning rate")
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", default=None, help="also write the records as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    attack = victim_attack(Path(args.model).parent / "meta.json")  # a bad victim stops before the data is read
    try:
        train = load_dataset("cifar10", "train", data_dir=args.data_dir)
        test = load_dataset("cifar10", "test", data_dir=args.data_dir).stratified_subset(args.n_test, seed=0)
    except PoisonlabError as e:
        raise SystemExit(f"error: {e}")
    victim, poisoned, poisoning, trusted = rebuild_victim(attack, args.model, train, args.seed, 0.05)
    records = speed(victim, poisoned, trusted, test, args) if args.part == "speed" else \
        abl_lr(poisoned, poisoning, test, args)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))


def speed(victim, poisoned, trusted, test, args) -> list[dict]:
    records = []
    for name, params, unit, units in SPEED_RUNS:
        row = {"defense": name, "params": params, "unit": unit}
        train = poisoned.subset(np.arange(args.abl_images)) if name == "abl" else poisoned
        for label, units_on in (("bf16", True), ("float32", False)):
            ctx = DefenseContext(train=train, model=copy.deepcopy(victim), test=test, train_model=None,
                                 clean_set=trusted, seed=args.seed)
            # float32: the precision rule told the CPU has no bf16 units (fit and every defence loop follow it)
            with mock.patch("poisonlab.training.device.fast_bf16", return_value=units_on):
                t0 = time.perf_counter()
                get_defense(name, **params).run(ctx)
                row[f"{label}_s_per_unit"] = (time.perf_counter() - t0) / units
        row["float32_over_bf16"] = row["float32_s_per_unit"] / row["bf16_s_per_unit"]
        print(f"{name:15s} {unit:26s} bf16 {row['bf16_s_per_unit']:7.2f} s  float32 {row['float32_s_per_unit']:7.2f} s"
              f"  ratio {row['float32_over_bf16']:.2f}", flush=True)
        records.append(row)
    return records


def abl_lr(poisoned, poisoning, test, args) -> list[dict]:
    records = []
    for lr in args.lrs:
        torch.manual_seed(args.seed)
        model = build_model_for("airnet", poisoned)
        ctx = DefenseContext(train=poisoned, model=model, test=test, train_model=None, poisoning=poisoning,
                             seed=args.seed)
        t0 = time.perf_counter()
        res = get_defense("abl", lr=lr, ascent="flooding", isolation_epochs=args.epochs, finetune_epochs=0,
                          unlearning_epochs=0).run(ctx)
        m = evaluate(res.model, test, poisoning)
        row = {"lr": lr, "epochs": args.epochs, "last_loss": res.metrics["isolation_loss"],
               "clean_acc": m["clean_acc"], "asr": m["asr"], "isolated_precision": res.metrics["det_precision"],
               "seconds": time.perf_counter() - t0}
        print(f"lr {lr:<6g} {args.epochs} isolation epochs: last batch loss {row['last_loss']:.3f}  clean "
              f"{row['clean_acc']:.4f}  ASR {row['asr']:.4f}  isolated 1% precision {row['isolated_precision']:.2f}"
              f"  ({row['seconds']:.0f} s)", flush=True)
        records.append(row)
    return records


if __name__ == "__main__":
    main()
