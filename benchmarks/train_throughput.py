"""Training throughput: poisonlab's loop vs a plain Dataset + DataLoader loop.

Same model (``vgg_like`` by default), same CIFAR-10 images, same augmentation
(random crop with 4-pixel padding + horizontal flip), same optimiser; one
epoch each over ``--n`` images. The baseline is the idiomatic PyTorch loop:
a ``Dataset`` whose ``__getitem__`` augments one image at a time, batched by
a ``DataLoader``. poisonlab keeps the data as one uint8 tensor and augments
whole batches on the device.

    python benchmarks/train_throughput.py --data-dir ../shared/data --n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from poisonlab.data import load_dataset
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit


class PerSampleAugmented(Dataset):
    """The common pattern: augment each image on its own in __getitem__ (no torchvision needed)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, padding: int = 4):
        self.images, self.labels, self.p = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(255)
        x = F.pad(x, (self.p,) * 4, mode="reflect")
        dy, dx = np.random.randint(0, 2 * self.p + 1, size=2)
        x = x[:, dy:dy + 32, dx:dx + 32]
        if np.random.rand() < 0.5:
            x = x.flip(2)
        return x, int(self.labels[i])


def plain_loop(model, images, labels, batch_size, lr, workers) -> float:
    ds = PerSampleAugmented(images, labels)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    t0 = time.perf_counter()
    for x, y in dl:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--model", default="vgg_like")
    ap.add_argument("--n", type=int, default=10000, help="training images per epoch")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    ap.add_argument("--bf16", action="store_true", help="poisonlab's loop under bfloat16 autocast (TrainConfig.bf16)")
    args = ap.parse_args()

    train = load_dataset("cifar10", "train", data_dir=args.data_dir).stratified_subset(args.n, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, crop_padding=4, flip=True, schedule="none",
                      bf16=args.bf16)
    ours, base = [], []
    for r in range(args.repeats):  # alternate, so background load hits both alike
        torch.manual_seed(r)
        m = build_model(args.model, 3, 10, 32)
        t0 = time.perf_counter()
        fit(m, train, cfg, seed=r)
        ours.append(time.perf_counter() - t0)
        torch.manual_seed(r)
        m = build_model(args.model, 3, 10, 32)
        base.append(plain_loop(m, train.images, train.labels, args.batch_size, 0.05, args.workers))
    res = {
        "model": args.model, "images": args.n, "bf16": args.bf16, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "poisonlab_img_per_s": args.n / min(ours), "dataloader_img_per_s": args.n / min(base),
        "ratio": min(base) / min(ours), "poisonlab_seconds": ours, "dataloader_seconds": base,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(), "torch": torch.__version__,
    }
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
