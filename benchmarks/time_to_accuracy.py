"""Time to accuracy on full CIFAR-10, and how close the training runs to the machine's limit.

Trains a preset (default: ``airbench94``, the ``airnet`` network with its recipe) on the 50,000
training images, measures test accuracy after every epoch (evaluation time excluded from the
training time) and reports when ``--target`` was first reached. FLOPs of the whole training are
counted with ``torch.utils.flop_counter`` and divided by the training time; the peak is a large
matmul in the same dtype, timed in the same run with the same thread count.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --target 0.94 --out docs/perf-logs/tta94.json
    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --preset airbench_quick --target 0.85
    python benchmarks/time_to_accuracy.py --data-dir ../shared/data --preset none --epochs 5   # the fastnet recipe

The JSON (stdout and ``--out``) holds final_test_acc (with the preset's test-time augmentation),
final_test_acc_no_tta, seconds_to_target (null if never reached), train_seconds, train_flops,
achieved_tflops, peak_tflops, mfu and one record per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from poisonlab.data import load_dataset
from poisonlab.models import build_model
from poisonlab.training import PRESETS, TrainConfig, fit, predict_proba
from poisonlab.training.device import resolve_device, use_bf16
from poisonlab.training.perf import matmul_peak_tflops, training_flops

PRESET_MODELS = {"airbench94": ("airnet", {}), "airbench_quick": ("airnet", {"widths": [32, 64, 128]})}
"""The network each preset was tuned for."""

# the fast recipe of the earlier fastnet figures (docs/performance.md), for --preset none
FASTNET_RECIPE = dict(batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      label_smoothing=0.2, schedule="onecycle", warmup_fraction=0.15, crop_padding=2, flip=True,
                      tta="flip")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f")))


def run(data_dir: str, preset: str | None = "airbench94", model: str | None = None,
        model_params: dict | None = None, overrides: dict | None = None, epochs: int | None = None,
        target: float = 0.94, seed: int = 0, n: int = 50000, bf16: str | bool = "auto",
        log=print) -> dict:
    """Train ``preset`` (None: the fastnet recipe) once and return the result record (see the module docstring)."""
    train = load_dataset("cifar10", "train", data_dir=data_dir)
    if n < len(train):
        train = train.stratified_subset(n, seed=0)
    test = load_dataset("cifar10", "test", data_dir=data_dir)
    recipe = dict(preset=preset) if preset else dict(FASTNET_RECIPE)
    if epochs:
        recipe["epochs"] = epochs
    recipe["bf16"] = bf16
    cfg = TrainConfig(**{**recipe, **(overrides or {})})
    model_name, params = PRESET_MODELS.get(preset or "", ("fastnet", {}))
    if model:
        model_name, params = model, {}
    params = {**params, **(model_params or {})}
    mean, std = train.channel_stats()
    torch.manual_seed(seed)
    dev = resolve_device("auto")  # a GPU when there is one
    net = build_model(model_name, 3, 10, 32, mean=mean, std=std, **params)

    use = use_bf16(cfg.bf16, dev, 32)
    flops = training_flops(net, train, cfg)
    peak = matmul_peak_tflops(torch.bfloat16 if use else torch.float32, device=dev)
    net = net.to(dev)
    load_before = os.getloadavg()
    results: list[dict] = []
    eval_seconds = 0.0
    t_start = time.perf_counter()

    def on_epoch(rec: dict, m: torch.nn.Module) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        trained = t0 - t_start - eval_seconds
        acc_plain = float((predict_proba(m, test).argmax(1) == test.labels).mean())
        row = {"epoch": rec["epoch"], "train_seconds": round(trained, 1), "test_acc_no_tta": acc_plain,
               "train_acc": round(rec["acc"], 4), "train_loss": round(rec["loss"], 4)}
        # test-time augmentation costs several forward passes: only near the target and at the end
        if cfg.tta != "none" and (acc_plain >= target - 0.02 or rec["epoch"] == cfg.epochs):
            row["test_acc"] = float((predict_proba(m, test, tta=cfg.tta).argmax(1) == test.labels).mean())
        elif cfg.tta == "none":
            row["test_acc"] = acc_plain
        eval_seconds += time.perf_counter() - t0
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        log(json.dumps(row))

    fit(net, train, cfg, seed=seed, epoch_callback=on_epoch)
    # every test-time augmentation on the final model, to show what each adds
    by_tta = {t: float((predict_proba(net, test, tta=t).argmax(1) == test.labels).mean())
              for t in ("none", "flip", "flip_translate")}
    train_seconds = results[-1]["train_seconds"]
    reached = next((r["train_seconds"] for r in results if r.get("test_acc", 0.0) >= target), None)
    achieved = flops / train_seconds / 1e12
    return {
        "model": model_name, "model_params": params, "preset": preset, "seed": seed,
        "recipe": cfg.model_dump(), "bf16": use, "device": str(dev), "threads": torch.get_num_threads(), "train_images": len(train),
        "target": target, "final_test_acc": results[-1]["test_acc"],
        "final_test_acc_no_tta": results[-1]["test_acc_no_tta"], "final_test_acc_by_tta": by_tta,
        "seconds_to_target": reached, "train_seconds": train_seconds, "train_flops": flops,
        "achieved_tflops": round(achieved, 4), "peak_tflops": round(peak, 4), "mfu": round(achieved / peak, 4),
        "per_epoch": results, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu": cpu_name(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--preset", default="airbench94", choices=[*PRESETS, "none"])
    ap.add_argument("--model", default=None, help="registry name (default: the preset's network)")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--target", type=float, default=0.94)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=50000, help="training images (stratified subset)")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one TrainConfig field (JSON value), e.g. --set micro_batch_size=null")
    ap.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a model parameter (JSON value), e.g. --model-param widths=[32,64,128]")
    ap.add_argument("--out", default="", help="write the JSON result here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def pairs(items: list[str]) -> dict:
        return {k: json.loads(v) for k, v in (s.split("=", 1) for s in items)}

    out = run(args.data_dir, None if args.preset == "none" else args.preset, args.model, pairs(args.model_param),
              pairs(args.set), args.epochs, args.target, args.seed, args.n,
              {"auto": "auto", "on": True, "off": False}[args.bf16])
    print(json.dumps(out, indent=2))
    if args.out:
        from poisonlab.utils import atomic_write_json

        atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
