"""Datasets: the :class:`ImageSet` type, readers and locating/downloading data."""

from __future__ import annotations

import os

from poisonlab.data.imageset import ImageSet, to_float, to_uint8_nhwc
from poisonlab.data.locate import SOURCES, fetch_dataset, find_dataset, missing_message
from poisonlab.data.readers import (
    read_cifar10,
    read_digits,
    read_idx,
    read_image_folder,
    read_mnist_like,
)
from poisonlab.errors import DataError

DATASETS = {
    "digits": "scikit-learn 8x8 digits, 1,437 train / 360 test, embedded (no download)",
    "cifar10": "CIFAR-10 python batches, 50,000 / 10,000, 32x32x3",
    "mnist": "MNIST idx files, 60,000 / 10,000, 28x28x1",
    "fashion_mnist": "Fashion-MNIST idx files, 60,000 / 10,000, 28x28x1",
    "folder": "an image folder, one sub-folder per class (set path=...)",
}

_ALIASES = {"cifar-10": "cifar10", "fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist"}


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    path: str | os.PathLike[str] | None = None,
    image_size: int = 32,
) -> ImageSet:
    """Load a dataset split as an :class:`ImageSet`.

    Args:
        name: one of ``digits``, ``cifar10``, ``mnist``, ``fashion_mnist``, ``folder``.
        split: ``"train"`` or ``"test"``.
        data_dir: where to look first (see :mod:`poisonlab.data.locate` for the search order).
        download: fetch missing files from the official location.
        path: for ``folder``, the image folder (one sub-folder per class).
        image_size: for ``folder``, the side length images are resized to.
    """
    name = _ALIASES.get(name, name)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return read_digits(split)
    if name == "folder":
        if path is None:
            raise DataError("dataset 'folder' needs path=<image folder>")
        return read_image_folder(path, size=image_size)
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    folder = find_dataset(name, data_dir)
    if folder is None:
        if not download:
            raise DataError(missing_message(name, data_dir))
        folder = fetch_dataset(name, data_dir)
    if name == "cifar10":
        return read_cifar10(folder, split)
    return read_mnist_like(folder, split, name=name)


__all__ = [
    "ImageSet", "load_dataset", "DATASETS", "read_cifar10", "read_digits", "read_idx", "read_image_folder",
    "read_mnist_like", "fetch_dataset", "find_dataset", "to_float", "to_uint8_nhwc",
]
