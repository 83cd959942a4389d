"""Where bf16 autocast pays: training-step and inference speed in float32 vs bf16 by image size.

Times ``--steps`` training steps (after one warm-up) and a forward pass of ``fastnet`` and ``airnet``
on random images of each size, under bfloat16 autocast and in float32, and prints the speed-up per
size. ``poisonlab.training.device.BF16_MIN_IMAGE_SIZE`` (the ``bf16="auto"`` rule) was chosen from
this table.

    python benchmarks/bf16_rule.py --threads 2 --out docs/perf-logs/bf16_rule.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from poisonlab.models import build_model


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def speeds(name: str, size: int, batch: int, bf16: bool, repeats: int) -> tuple[float, float]:
    """(training images/s, inference images/s) for ``name`` on ``size`` x ``size`` x 3 images."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10, size).to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model.train()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(x)

    return batch / timed(step, repeats), batch / timed(infer, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,12,16,24,32")
    ap.add_argument("--models", default="fastnet,airnet")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            f32 = speeds(name, size, args.batch, False, args.repeats)
            b16 = speeds(name, size, args.batch, True, args.repeats)
            row = {"model": name, "size": size, "train_img_s_fp32": round(f32[0], 1),
                   "train_img_s_bf16": round(b16[0], 1), "train_speedup": round(b16[0] / f32[0], 2),
                   "infer_img_s_fp32": round(f32[1], 1), "infer_img_s_bf16": round(b16[1], 1),
                   "infer_speedup": round(b16[1] / f32[1], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from poisonlab.utils import atomic_write_json

        atomic_write_json(args.out, {"threads": torch.get_num_threads(), "batch": args.batch, "rows": rows,
                                     "torch": torch.__version__})


if __name__ == "__main__":
    main()
