"""Readers for the canonical on-disk formats of the supported datasets.

Each reader takes a folder (or file) and returns an :class:`ImageSet`; they
are the same code a user's download goes through.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from poisonlab.data.imageset import ImageSet
from poisonlab.data.safe_pickle import safe_load
from poisonlab.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# --------------------------------------------------------------------- CIFAR
def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10 batch file not found")
    with open(path, "rb") as f:
        d = safe_load(f, source=str(path))
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{path}: missing field {key!r}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: field 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in [0, 9], found [{labels.min()}, {labels.max()}]")
    # rows are channel-major (1024 R, 1024 G, 1024 B)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10(folder: str | os.PathLike[str], split: str = "train") -> ImageSet:
    """Read the CIFAR-10 python batches in ``folder`` (``cifar-10-batches-py``).

    Args:
        folder: directory holding ``data_batch_1..5``, ``test_batch`` and optionally ``batches.meta``.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).

    Returns:
        An ImageSet of uint8 (N, 32, 32, 3) images.
    """
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / n) for n in names]
    classes = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        with open(meta_path, "rb") as f:
            meta = safe_load(f, source=str(meta_path))
        names_b = meta.get(b"label_names") if isinstance(meta, dict) else None
        if names_b and len(names_b) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_b]
    return ImageSet(
        images=np.concatenate([p[0] for p in parts]),
        labels=np.concatenate([p[1] for p in parts]),
        classes=list(classes),
        name=f"cifar10-{split}",
    )


# ----------------------------------------------------------------------- idx
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (optionally gzipped), checking the magic number and the size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: idx file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad idx magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: idx header says shape {shape} ({expected} bytes) but the file holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.gz", folder / stem, folder / stem.replace("-idx", ".idx")):
        if cand.is_file():
            return cand
    raise DataError(f"{folder}: neither {stem}.gz nor {stem} found")


def read_mnist_like(folder: str | os.PathLike[str], split: str = "train", name: str = "mnist") -> ImageSet:
    """Read MNIST or Fashion-MNIST idx files (gzipped or not) from ``folder``."""
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{folder}: {prefix} images must be a uint8 (N, H, W) idx array, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{folder}: {len(images)} images but labels of shape {labels.shape}")
    if labels.max() > 9:
        raise DataError(f"{folder}: labels must lie in [0, 9], found max {labels.max()}")
    classes = FASHION_CLASSES if name.startswith("fashion") else MNIST_CLASSES
    return ImageSet(images=images[..., None], labels=labels.astype(np.int64), classes=list(classes),
                    name=f"{name}-{split}")


# -------------------------------------------------------------------- digits
def read_digits(split: str = "train", test_fraction: float = 0.2) -> ImageSet:
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped inside scikit-learn).

    Pixel values 0..16 are scaled to 0..255. The train/test split is a fixed
    stratified split (seed 0) so every run sees the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=0)
    idx = np.sort(tr if split == "train" else te)
    return ImageSet(images=images[idx], labels=labels[idx], classes=MNIST_CLASSES.copy(), name=f"digits-{split}")


# -------------------------------------------------------------- image folder
def read_image_folder(
    folder: str | os.PathLike[str], size: int | tuple[int, int] = 32, channels: int = 3
) -> ImageSet:
    """Read a folder with one sub-folder per class of PNG/JPEG images.

    Images are converted to RGB (or grayscale with ``channels=1``) and resized
    to ``size``. Unreadable files do not stop the read: they are listed in
    ``meta["unreadable"]`` as ``(relative path, reason)`` and a warning names them.

    Returns:
        An ImageSet whose ``paths`` are relative to ``folder``.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder}: expected one sub-folder per class, found none")
    h, w = (size, size) if isinstance(size, int) else size
    mode = "RGB" if channels == 3 else "L"
    images, labels, paths, unreadable = [], [], [], []
    for ci, cdir in enumerate(class_dirs):
        for p in sorted(cdir.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = str(p.relative_to(folder))
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                unreadable.append((rel, f"{type(e).__name__}: {e}"))
                continue
            images.append(arr if arr.ndim == 3 else arr[..., None])
            labels.append(ci)
            paths.append(rel)
    if unreadable:
        shown = ", ".join(r for r, _ in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        warnings.warn(f"{folder}: skipped {len(unreadable)} unreadable image(s): {shown}{more}", stacklevel=2)
    if not images:
        raise DataError(f"{folder}: no readable images found (extensions {sorted(IMAGE_EXTENSIONS)})")
    s = ImageSet(
        images=np.stack(images), labels=np.asarray(labels), classes=[d.name for d in class_dirs],
        name=folder.name, paths=paths,
    )
    s.meta["unreadable"] = unreadable
    s.meta["root"] = str(folder)
    return s
