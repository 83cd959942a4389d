"""Shared test helpers: a small model trained on the 8x8 digits, a tiny grid, a benchmark script as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit

WIDTHS = (16, 32, 64)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), registered under ``name``
    (dataclasses look their module up while being built)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def train_small(train, sample_weight=None, description: str = "train", history_out: list | None = None,
                epochs: int = 4, batch_weight_fn=None, **over):
    """A seeded narrow fastnet fitted on ``train`` (8x8, 1 channel); ``over`` overrides the recipe."""
    torch.manual_seed(0)
    m = build_model("fastnet", 1, train.num_classes, 8, widths=WIDTHS)
    h = fit(m, train, TrainConfig(**({"epochs": epochs, "batch_size": 64} | over)), sample_weight=sample_weight,
            batch_weight_fn=batch_weight_fn)
    if history_out is not None:
        history_out.extend(h)
    return m


# a one-epoch grid on 300 digits with a narrow fastnet and one attack: seconds, for tests of the command line
TINY_GRID = """name = "tiny"
seeds = [0]
[dataset]
name = "digits"
train_size = 300
test_size = 100
[model]
name = "fastnet"
params = { widths = [8, 16, 16] }
[training]
epochs = 1
batch_size = 64
[[attacks]]
name = "random_flip"
rate = 0.2
"""
