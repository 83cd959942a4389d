"""The one in-memory image-set type every stage passes along."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from poisonlab.errors import DataError, ParameterError


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)``, integer labels ``(N,)`` and class names.

    ``paths`` optionally names the file each image came from (image folders),
    so that an audit can point back at the user's files.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str = ""
    paths: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim == 3:  # (N, H, W) grayscale
            self.images = self.images[..., None]
        if self.images.ndim != 4:
            raise DataError(f"{self.name or 'ImageSet'}: images must be (N, H, W, C), got shape {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise DataError(f"{self.name or 'ImageSet'}: images must be uint8, got {self.images.dtype}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.images),):
            raise DataError(
                f"{self.name or 'ImageSet'}: {len(self.images)} images but labels of shape {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"{self.name or 'ImageSet'}: labels must lie in [0, {len(self.classes) - 1}], "
                f"found [{self.labels.min()}, {self.labels.max()}]"
            )
        if self.paths is not None and len(self.paths) != len(self.images):
            raise DataError(f"{self.name or 'ImageSet'}: {len(self.paths)} paths for {len(self.images)} images")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape ``(H, W, C)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units (the models normalise with them)."""
        return channel_stats(self.images)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            meta=dict(self.meta),
        )

    def copy(self) -> "ImageSet":
        return replace(
            self,
            images=self.images.copy(),
            labels=self.labels.copy(),
            paths=list(self.paths) if self.paths is not None else None,
            meta=dict(self.meta),
        )

    def with_data(self, images: np.ndarray | None = None, labels: np.ndarray | None = None) -> "ImageSet":
        """A new set sharing class names and paths, with images and/or labels replaced."""
        return replace(
            self,
            images=self.images if images is None else images,
            labels=self.labels if labels is None else labels,
            meta=dict(self.meta),
        )

    def stratified_indices(self, n: int, seed: int = 0) -> np.ndarray:
        """Indices of ``n`` samples keeping the class proportions (sorted)."""
        if not 1 <= n <= len(self):
            raise ParameterError(f"subset size must be in [1, {len(self)}], got {n}")
        if n == len(self):
            return np.arange(len(self))
        from sklearn.model_selection import train_test_split

        counts = self.class_counts()
        stratify = self.labels if counts[counts > 0].min() >= 2 and n >= self.num_classes else None
        idx, _ = train_test_split(
            np.arange(len(self)), train_size=n, stratify=stratify, random_state=seed
        )
        return np.sort(idx)

    def stratified_subset(self, n: int, seed: int = 0) -> "ImageSet":
        return self.subset(self.stratified_indices(n, seed))

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageSet", "ImageSet", np.ndarray, np.ndarray]:
        """Stratified split into (rest, held-out) with held-out ``fraction``; also returns both index arrays."""
        if not 0.0 < fraction < 1.0:
            raise ParameterError(f"split fraction must be in (0, 1), got {fraction}")
        n_out = max(1, int(round(fraction * len(self))))
        held = self.stratified_indices(n_out, seed)
        mask = np.ones(len(self), dtype=bool)
        mask[held] = False
        rest = np.nonzero(mask)[0]
        return self.subset(rest), self.subset(held), rest, held

    # ------------------------------------------------------------- tensors
    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NCHW image tensor and int64 labels, on ``device`` (conversion to float happens per batch)."""
        x = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(self.labels)
        return x.to(device), y.to(device)

    def float_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images as float NCHW in [0, 1]."""
        return to_float(self.tensors(device)[0])


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images in [0, 1] units; std floored at 1e-3."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return x.mean(0).tolist(), np.maximum(x.std(0), 1e-3).tolist()


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1]."""
    return x_uint8.float().div_(255.0)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC numpy (rounded, clipped)."""
    return (x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
