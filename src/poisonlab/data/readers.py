"""Readers for the canonical on-disk formats of the supported datasets.

Each reader takes a folder (or file) and returns an :class:`ImageSet`; they
are the same code a user's download goes through.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO

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
def _describe(value: Any) -> str:
    """A short description of a value found where another was expected: its type and a clipped repr."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype.name} with shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _cifar_labels(value: Any, n: int, path: Path) -> np.ndarray:
    """The ``labels`` field of a batch as int64, refusing anything that is not ``n`` integers in [0, 9].

    Floats, bools and strings are refused rather than cast: ``int(1.7)`` or ``int(True)`` would read a
    damaged file as a valid one with different labels.
    """
    want = f"{path}: field 'labels' must be a list of {n} integers in [0, 9]"
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise DataError(f"{want}, found {_describe(value)}")
        labels = value.astype(np.int64)
    elif isinstance(value, list):
        for i, x in enumerate(value):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or not 0 <= x <= 9:
                raise DataError(f"{want}, found {_describe(x)} at index {i}")
        labels = np.array(value, dtype=np.int64)
    else:
        raise DataError(f"{want}, found {_describe(value)}")
    if len(labels) != n:
        raise DataError(f"{want} (one per image), found {len(labels)}")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{want}, found values in [{labels.min()}, {labels.max()}]")
    return labels


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: CIFAR-10 batch file not found")
    with open(path, "rb") as f:
        d = safe_load(f, source=str(path))
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, found {type(d).__name__}")
    d = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in d.items()}
    for key in ("data", "labels"):
        if key not in d:
            raise DataError(f"{path}: missing field {key!r}")
    data = d["data"]
    # an ndarray, never a list: a pickled list can repeat one row by reference and expand to gigabytes here
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: field 'data' must be uint8 of shape (N, 3072) (an array), found {_describe(data)}")
    if len(data) == 0:
        raise DataError(f"{path}: field 'data' holds 0 images; a batch needs at least one")
    labels = _cifar_labels(d["labels"], len(data), path)
    # rows are channel-major (1024 R, 1024 G, 1024 B)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_class_names(path: Path) -> list[str]:
    """The ``label_names`` of ``batches.meta``: 10 distinct names, as bytes (the official file) or str."""
    with open(path, "rb") as f:
        meta = safe_load(f, source=str(path))
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a dict, found {type(meta).__name__}")
    names = meta.get(b"label_names", meta.get("label_names"))
    if names is None:
        return list(CIFAR10_CLASSES)
    want = f"{path}: field 'label_names' must be a list of 10 distinct names (bytes or str)"
    if not isinstance(names, list):
        raise DataError(f"{want}, found {'a numpy array' if isinstance(names, np.ndarray) else type(names).__name__}")
    if len(names) != 10:
        raise DataError(f"{want}, found {len(names)}")
    out: list[str] = []
    for i, n in enumerate(names):
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{want}, found bytes that are not UTF-8 at index {i}") from None
        if not isinstance(n, str) or not n.strip():
            raise DataError(f"{want}, found {_describe(n)} at index {i}")
        if n in out:
            raise DataError(f"{want}, found {n!r} more than once")
        out.append(n)
    return out


def read_cifar10(folder: str | os.PathLike[str], split: str = "train") -> ImageSet:
    """Read the CIFAR-10 python batches in ``folder`` (``cifar-10-batches-py``).

    Args:
        folder: directory holding ``data_batch_1..5``, ``test_batch`` and optionally ``batches.meta``.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).

    Returns:
        An ImageSet of uint8 (N, 32, 32, 3) images.

    Raises:
        DataError: naming the file and field, for a missing or damaged batch; ``labels`` that are not
            integers in [0, 9] (floats and bools are refused, not cast); ``label_names`` that are not a list
            of 10 distinct names.
    """
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / n) for n in names]
    meta_path = folder / "batches.meta"
    classes = _cifar_class_names(meta_path) if meta_path.is_file() else list(CIFAR10_CLASSES)
    return ImageSet(
        images=np.concatenate([p[0] for p in parts]),
        labels=np.concatenate([p[1] for p in parts]),
        classes=classes,
        name=f"cifar10-{split}",
    )


# ----------------------------------------------------------------------- idx
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_at_most(f: BinaryIO, n: int, chunk: int = 1 << 20) -> bytearray:
    """Up to ``n`` bytes from ``f``, read in chunks: memory follows what is there, not what ``n`` claims."""
    buf = bytearray()
    while len(buf) < n:
        block = f.read(min(chunk, n - len(buf)))
        if not block:
            break
        buf += block
    return buf


def read_idx(path: str | os.PathLike[str], max_bytes: int = 1 << 30) -> np.ndarray:
    """Read an idx file (gzipped when its name ends in ``.gz``) into an array of the shape its header declares.

    The header is checked before any data is read: a known magic number, and a declared size (computed
    without overflow) of at most ``max_bytes``. Then at most that size plus one byte is decompressed, so a
    small gzip that expands to gigabytes costs no more memory than its header claims; a file holding more
    or less data than the header declares is a :class:`DataError` naming both sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: idx file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_at_most(f, 4)
            if len(head) < 4:
                raise DataError(f"{path}: too short to be an idx file ({len(head)} bytes)")
            zero, dtype_code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
                raise DataError(f"{path}: bad idx magic number 0x{head.hex()}")
            dims = _read_at_most(f, 4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"{path}: truncated idx header")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[dtype_code])
            expected = math.prod(shape) * dtype.itemsize  # Python integers: a header cannot overflow this
            if expected > max_bytes:
                raise DataError(f"{path}: idx header declares shape {shape} ({expected} bytes), more than the "
                                f"{max_bytes}-byte limit (max_bytes)")
            raw = _read_at_most(f, expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) > expected:
        raise DataError(f"{path}: holds more data than its header declares (shape {shape}, {expected} bytes)")
    if len(raw) < expected:
        raise DataError(
            f"{path}: idx header says shape {shape} ({expected} bytes) but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for cand in (folder / f"{stem}.gz", folder / stem, folder / stem.replace("-idx", ".idx")):
        if cand.is_file():
            return cand
    raise DataError(f"{folder}: neither {stem}.gz nor {stem} found")


def read_mnist_like(folder: str | os.PathLike[str], split: str = "train", name: str = "mnist") -> ImageSet:
    """Read MNIST or Fashion-MNIST idx files (gzipped or not) from ``folder``.

    Raises:
        DataError: naming the file, for images that are not a non-empty uint8 ``(N, H, W)`` array, or labels
            that are not ``N`` integers in [0, 9] (float labels are refused, not cast).
    """
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: images must be a uint8 (N, H, W) idx array, got {images.dtype} {images.shape}")
    if 0 in images.shape:
        raise DataError(f"{images_path}: holds {len(images)} images of {images.shape[1]}x{images.shape[2]} pixels; "
                        "a dataset needs at least one image of at least 1x1")
    labels = read_idx(labels_path)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(images)} images but labels of shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: labels must be integers in [0, 9], found {labels.dtype.name}")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{labels_path}: labels must lie in [0, 9], found [{labels.min()}, {labels.max()}]")
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
def _to_8bit(im: Any) -> Any:
    """``im`` with 8-bit channels: 16-bit grey is scaled (65535 -> 255), never clipped at 255.

    Pillow's own ``convert`` clips 16-bit values, which would turn almost every pixel white; 32-bit
    integer and float images have no defined range, so they are refused rather than guessed.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):  # PNG has no 32-bit pixels
        scaled = np.round(np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L")
    if im.mode in ("I", "F"):
        kind = "32-bit integer" if im.mode == "I" else "floating-point"
        raise ValueError(f"pixel mode {im.mode} ({kind}) has no defined 8-bit range; save it with 8 or 16 bits")
    return im


def _read_image(path: Path, size: tuple[int, int], mode: str, max_pixels: int | None) -> np.ndarray:
    """One image file as a uint8 (H, W) or (H, W, 3) array of ``size`` (width, height)."""
    from PIL import Image

    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it, then decodes anyway: treat that as an error too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ValueError(f"{im.width}x{im.height} pixels, more than max_pixels={max_pixels}")
            im = _to_8bit(im).convert(mode)
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)


def read_image_folder(
    folder: str | os.PathLike[str], size: int | tuple[int, int] = 32, channels: int = 3,
    max_pixels: int | None = None,
) -> ImageSet:
    """Read a folder with one sub-folder per class of PNG/JPEG images.

    Images are converted to RGB (or grayscale with ``channels=1``) and resized to ``size``; 16-bit images
    are scaled to 8 bits. Unreadable files do not stop the read: they are listed in ``meta["unreadable"]``
    as ``(relative path, reason)`` and a warning names them. Unreadable includes corrupt files, 32-bit and
    float pixel modes, and images of more than ``max_pixels`` pixels (default: Pillow's decompression-bomb
    limit, ``PIL.Image.MAX_IMAGE_PIXELS``), which are refused from their header before being decoded.

    Returns:
        An ImageSet whose ``paths`` are relative to ``folder``.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder}: expected one sub-folder per class, found none")
    h, w = (size, size) if isinstance(size, int) else size
    mode = "RGB" if channels == 3 else "L"
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS
    images, labels, paths, unreadable = [], [], [], []
    for ci, cdir in enumerate(class_dirs):
        for p in sorted(cdir.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = str(p.relative_to(folder))
            try:
                arr = _read_image(p, (w, h), mode, max_pixels)
            except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on damaged files
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
