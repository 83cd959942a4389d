"""Where to compute and in which precision: ``device="auto"`` and ``bf16="auto"``.

One rule serves training (:func:`poisonlab.training.fit`) and inference (prediction, features,
STRIP, the audit's fold models).
"""

from __future__ import annotations

from typing import Literal

import torch

from poisonlab.utils import fast_bf16

BF16_MIN_IMAGE_SIZE = 16
"""Smallest image side for which ``bf16="auto"`` turns bfloat16 autocast on (CPU).

Measured on the project's 2-core CPUs (docs/performance.md, ``benchmarks/bf16_rule.py``): a
``fastnet`` training step on 32x32 CIFAR-sized batches is 2.3-2.9x faster under bf16 autocast, on 8x8
digits many times slower (oneDNN's bf16 kernels do not pay for tiny feature maps, and the casts
dominate); the crossover lies between 8 and 16 pixels.
"""


def resolve_device(device: torch.device | str | None = "auto") -> torch.device:
    """``"auto"`` or None -> CUDA when present, else the CPU; anything else -> ``torch.device(device)``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(setting: bool | Literal["auto"] | str | None, device: torch.device | str, image_size: int) -> bool:
    """Whether to run under bfloat16 autocast.

    ``True``/``False`` force it. ``"auto"`` (or None): on CUDA always; on a CPU only where it has native
    bf16 units (:func:`poisonlab.utils.fast_bf16`: AVX512-BF16 or AMX) and the images are at least
    :data:`BF16_MIN_IMAGE_SIZE` pixels on a side.
    """
    if isinstance(setting, bool):
        return setting
    if setting not in (None, "auto"):
        raise ValueError(f"bf16 must be true, false or 'auto', got {setting!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and image_size >= BF16_MIN_IMAGE_SIZE and fast_bf16(device)


def autocast(enabled: bool, device: torch.device | str) -> torch.autocast:
    """A bfloat16 autocast context for ``device``'s type, active when ``enabled`` (the answer of
    :func:`use_bf16`) and a no-op otherwise. Every loop of the package enters bf16 through here."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled))
