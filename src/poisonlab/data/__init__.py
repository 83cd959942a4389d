"""Datasets: the :class:`ImageSet` type, readers and locating/downloading data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from poisonlab.data.imageset import ImageSet, as_imageset, float_nchw, nchw_tensor, to_float, to_uint8_nhwc
from poisonlab.data.locate import SOURCES, fetch_dataset, find_dataset, missing_message
from poisonlab.data.readers import (
    read_cifar10,
    read_digits,
    read_idx,
    read_image_folder,
    read_mnist_like,
)
from poisonlab import plugins
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
    loader: str | None = None,
) -> ImageSet:
    """Load a dataset split as an :class:`ImageSet`.

    Args:
        name: one of ``digits``, ``cifar10``, ``mnist``, ``fashion_mnist``, ``folder``, or a dataset an
            installed plug-in registers (entry point group ``poisonlab.datasets``).
        split: ``"train"`` or ``"test"``.
        data_dir: where to look first (see :mod:`poisonlab.data.locate` for the search order).
        download: fetch missing files from the official location.
        path: for ``folder``, the image folder (one sub-folder per class).
        image_size: for ``folder``, the side length images are resized to.
        loader: an import path ``"mypkg.data:load"`` of your own loader (then ``name`` only names
            the dataset in results): ``load(split)`` returns an ImageSet, an ``(images, labels[,
            classes])`` tuple or a dataset of ``(image, label)`` pairs (see :func:`as_imageset`).
    """
    name = _ALIASES.get(name, name)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if loader is not None or name not in DATASETS:
        fn = _plugin_loader(name, loader)
        if fn is not None:
            return as_imageset(fn(split), name=f"{name} ({split})")
    if name == "digits":
        return read_digits(split)
    if name == "folder":
        if path is None:
            raise DataError("dataset 'folder' needs path=<image folder>")
        return read_image_folder(path, size=image_size)
    if name not in SOURCES:
        known = ", ".join(list(DATASETS) + sorted(plugins.entry_points("dataset")))
        raise DataError(f"unknown dataset {name!r}; known: {known} (or set loader = 'mypkg.module:function')")
    folder = find_dataset(name, data_dir)
    if folder is None:
        if not download:
            raise DataError(missing_message(name, data_dir))
        folder = fetch_dataset(name, data_dir)
    if name == "cifar10":
        return read_cifar10(folder, split)
    return read_mnist_like(folder, split, name=name)


def _plugin_loader(name: str, loader: str | None) -> Any:
    """The loader function of an import path, or of an installed ``poisonlab.datasets`` entry point; else None."""
    if loader is not None:
        fn = plugins.load_object(loader, "dataset loader")
    else:
        ep = plugins.entry_points("dataset").get(name)
        if ep is None:
            return None
        fn = plugins.load_entry_point("dataset", ep)
    if not callable(fn):
        raise DataError(f"dataset {name!r}: loader {loader or name!r} is a {type(fn).__name__}, not a function")
    return fn


@dataclass(frozen=True)
class Splits:
    """A dataset's training and test sets."""

    train: ImageSet
    test: ImageSet


def load_data(name: str = "digits", *, train_size: int | None = None, test_size: int | None = None,
              data_dir: str | os.PathLike[str] | None = None, download: bool = False,
              path: str | os.PathLike[str] | None = None, image_size: int = 32, loader: str | None = None) -> Splits:
    """Both splits of a dataset, with stratified subsets of ``train_size`` / ``test_size`` images (seed 0).

    The keyword arguments are those of a config's ``[dataset]`` table (see :func:`load_dataset`),
    so ``load_data(**dataset_config.model_dump())`` loads what a config names. An image folder
    (``folder``) has one split: a stratified 20% of it is held out as the test set.
    """
    kw = dict(data_dir=data_dir, download=download, path=path, image_size=image_size, loader=loader)
    train = load_dataset(name, "train", **kw)
    if name == "folder" and loader is None:
        train, test, _, _ = train.split(0.2, seed=0)
    else:
        test = load_dataset(name, "test", **kw)
    if train_size and train_size < len(train):
        train = train.stratified_subset(train_size, seed=0)
    if test_size and test_size < len(test):
        test = test.stratified_subset(test_size, seed=0)
    return Splits(train, test)


__all__ = [
    "ImageSet", "load_dataset", "DATASETS", "read_cifar10", "read_digits", "read_idx", "read_image_folder",
    "read_mnist_like", "fetch_dataset", "find_dataset", "to_float", "to_uint8_nhwc", "load_data", "Splits",
    "as_imageset", "nchw_tensor", "float_nchw",
]
