"""The one in-memory image-set type every stage passes along."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

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
        if not isinstance(self.images, np.ndarray):
            raise DataError(f"{self.name or 'ImageSet'}: images must be a uint8 (N, H, W, C) numpy array, got "
                            f"{type(self.images).__name__}; ImageSet.from_arrays converts torch tensors, NCHW "
                            f"and float images")
        if self.images.ndim == 3:  # (N, H, W) grayscale
            self.images = self.images[..., None]
        if self.images.ndim != 4:
            raise DataError(f"{self.name or 'ImageSet'}: images must be (N, H, W, C), got shape {self.images.shape}")
        if self.images.dtype != np.uint8:
            raise DataError(f"{self.name or 'ImageSet'}: images must be uint8, got {self.images.dtype} "
                            f"(ImageSet.from_arrays converts float images in [0, 1])")
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

    # ------------------------------------------------------------ building
    @classmethod
    def from_arrays(cls, images: Any, labels: Any, classes: Sequence[str] | None = None, *,
                    layout: str | None = None, name: str = "") -> "ImageSet":
        """An ImageSet from numpy arrays or torch tensors in any common layout.

        Args:
            images: ``(N, H, W, C)`` or ``(N, C, H, W)`` (or ``(N, H, W)`` grayscale), numpy or torch,
                uint8 in 0..255 or float in [0, 1]. The layout is read from the shape (the channel
                axis has 1 to 4 entries); when both axes could be channels, or neither, pass ``layout``.
            labels: ``(N,)`` integer class indices, numpy, torch or a list.
            classes: class names; default ``"0" .. "K-1"`` for K = the largest label + 1.
            layout: ``"NHWC"`` or ``"NCHW"`` to state the layout instead of detecting it.
            name: a name for messages.

        Returns:
            An ImageSet holding uint8 NHWC images (floats are scaled by 255 and rounded).
        """
        who = name or "ImageSet.from_arrays"
        x = as_uint8_nhwc(images, layout=layout, who=who)
        y = _as_int_labels(labels, len(x), who)
        if classes is None:
            classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 1)]
        return cls(images=x, labels=y, classes=[str(c) for c in classes], name=name)

    @classmethod
    def from_dataset(cls, dataset: Any, classes: Sequence[str] | None = None, *, layout: str | None = None,
                     name: str = "") -> "ImageSet":
        """An ImageSet from a ``torch.utils.data.Dataset`` (or any sequence) of ``(image, label)`` pairs.

        Each image may be a PIL image, a numpy array or a torch tensor (``(H, W)``, ``(H, W, C)`` or
        ``(C, H, W)``, uint8 or float in [0, 1], e.g. what torchvision's ``ToTensor`` gives); all must
        have the same shape. ``classes`` defaults to ``dataset.classes`` when the dataset has it.
        The whole dataset is read into memory once.
        """
        who = name or type(dataset).__name__
        items = ([dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__")
                 and hasattr(dataset, "__getitem__") else list(dataset))
        if not items:
            raise DataError(f"{who}: the dataset is empty")
        images: list[np.ndarray] = []
        labels = []
        for i, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise DataError(f"{who}: item {i} is not an (image, label) pair (got {type(item).__name__})")
            img = _as_numpy(item[0])
            if images and img.shape != images[0].shape:
                raise DataError(f"{who}: item {i} has an image of shape {img.shape}, item 0 one of shape "
                                f"{images[0].shape}; resize the images to one size first")
            images.append(img)
            labels.append(_scalar_label(item[1], i, who))
        if classes is None and isinstance(getattr(dataset, "classes", None), (list, tuple)):
            classes = list(dataset.classes)
        return cls.from_arrays(np.stack(images), np.asarray(labels), classes, layout=layout, name=name)

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
        x = nchw_tensor(self.images).contiguous()
        y = torch.from_numpy(self.labels)
        return x.to(device), y.to(device)

    def float_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Images as float NCHW in [0, 1]."""
        return float_nchw(self, device)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images in [0, 1] units; std floored at 1e-3."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return x.mean(0).tolist(), np.maximum(x.std(0), 1e-3).tolist()


# ------------------------------------------------------------------ layouts
LAYOUTS = ("NHWC", "NCHW")
_MAX_CHANNELS = 4  # grey, grey + alpha, RGB, RGBA: a wider axis is a spatial one


def detect_layout(shape: Sequence[int], layout: str | None = None, who: str = "images") -> str:
    """``"NHWC"`` or ``"NCHW"`` for a 4-D image batch of ``shape``.

    With ``layout`` given it is checked and returned. Otherwise the channel axis is the one of
    axes 1 and 3 with at most 4 entries; when both or neither qualify the layout is ambiguous and
    a :class:`DataError` says how to state it.
    """
    if layout is not None:
        if layout not in LAYOUTS:
            raise DataError(f"{who}: layout must be 'NHWC' or 'NCHW', got {layout!r}")
        return layout
    last, second = shape[3] <= _MAX_CHANNELS, shape[1] <= _MAX_CHANNELS
    if last != second:
        return "NHWC" if last else "NCHW"
    why = "both axis 1 and axis 3 could be" if last else "neither axis 1 nor axis 3 (at most 4 entries) looks like"
    raise DataError(f"{who}: cannot tell the layout of images of shape {tuple(shape)}: {why} the channel axis; "
                    f"state it with layout='NHWC' or layout='NCHW'")


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or PIL image (bfloat16 tensors as float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def as_uint8_nhwc(images: Any, layout: str | None = None, who: str = "images") -> np.ndarray:
    """uint8 ``(N, H, W, C)`` numpy images from numpy/torch, NHWC/NCHW/(N, H, W), uint8 or float in [0, 1].

    Floats are scaled by 255 and rounded; floats outside [0, 1], other integer types and bools are
    refused with a :class:`DataError` that says how to convert them (nothing is cast silently).
    """
    x = _as_numpy(images)
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        if detect_layout(x.shape, layout, who) == "NCHW":
            x = x.transpose(0, 2, 3, 1)
    else:
        raise DataError(f"{who}: images must be 4-D (N, H, W, C) / (N, C, H, W) or 3-D (N, H, W), "
                        f"got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = (float(np.nanmin(x)), float(np.nanmax(x))) if x.size else (0.0, 1.0)
        if not np.isfinite(x).all() or lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{who}: float images must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]"
                            + (" (divide by 255, or pass uint8)" if hi > 1 else ""))
        return np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
    raise DataError(f"{who}: images must be uint8 (0..255) or float in [0, 1], got {x.dtype}; convert them "
                    f"first, e.g. images.astype(np.uint8) for integer values in 0..255")


def _as_int_labels(labels: Any, n: int, who: str) -> np.ndarray:
    y = _as_numpy(labels) if not isinstance(labels, (list, tuple)) else np.asarray(labels)
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{who}: labels must be integers (class indices), got {y.dtype}")
    if y.shape != (n,):
        raise DataError(f"{who}: {n} images but labels of shape {tuple(y.shape)}")
    if n and y.min() < 0:
        raise DataError(f"{who}: labels must be class indices >= 0, found {int(y.min())}")
    return y.astype(np.int64)


def _scalar_label(label: Any, i: int, who: str) -> int:
    v = _as_numpy(label)
    if v.size != 1 or v.dtype == bool or not np.issubdtype(v.dtype, np.integer):
        raise DataError(f"{who}: item {i} has label {label!r}; labels must be integer class indices")
    return int(v.reshape(()))


def nchw_tensor(images: Any) -> torch.Tensor:
    """The one NHWC -> NCHW conversion: an ImageSet or a uint8 NHWC numpy array as an NCHW tensor
    (a view, same dtype); a tensor is taken as NCHW already and returned as it is."""
    if isinstance(images, ImageSet):
        images = images.images
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def float_nchw(images: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Float NCHW in [0, 1] on ``device`` from an ImageSet, a uint8 NHWC array, or an NCHW tensor
    (uint8, or float already in [0, 1])."""
    x = nchw_tensor(images).to(device)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def as_imageset(obj: Any, name: str = "", layout: str | None = None) -> "ImageSet":
    """An ImageSet from what a dataset loader may return.

    Accepted: an ImageSet; an ``(images, labels)`` or ``(images, labels, classes)`` tuple of
    arrays/tensors (see :meth:`ImageSet.from_arrays`); a dataset of ``(image, label)`` pairs
    (see :meth:`ImageSet.from_dataset`).
    """
    if isinstance(obj, ImageSet):
        return obj
    if isinstance(obj, tuple) and len(obj) in (2, 3) and not np.isscalar(obj[1]):
        return ImageSet.from_arrays(obj[0], obj[1], obj[2] if len(obj) == 3 else None, layout=layout, name=name)
    if hasattr(obj, "__getitem__") or hasattr(obj, "__iter__"):
        return ImageSet.from_dataset(obj, layout=layout, name=name)
    raise DataError(f"{name or 'dataset'}: expected an ImageSet, an (images, labels) tuple or a dataset of "
                    f"(image, label) pairs, got {type(obj).__name__}")


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1]."""
    return x_uint8.float().div_(255.0)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC numpy (rounded, clipped)."""
    return (x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
