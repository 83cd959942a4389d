"""Finding dataset files on disk, and downloading them when asked.

Search order for a dataset's folder: the ``data_dir`` argument (``--data-dir``),
the ``POISONLAB_DATA`` environment variable, then the user cache directory
(``$XDG_CACHE_HOME/poisonlab`` or ``~/.cache/poisonlab``). With
``download=True`` missing files are fetched from the official location into
the first of those, with an MD5 check and a progress bar.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from poisonlab.errors import DataError


@dataclass(frozen=True)
class RemoteFile:
    url: str
    md5: str
    filename: str


@dataclass(frozen=True)
class DatasetSource:
    folder: str           # folder name under the data root
    files: tuple[RemoteFile, ...]
    required: tuple[str, ...]  # files that must exist in the folder
    extract_tar: bool = False


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_source(folder: str, base_url: str, md5s: tuple[str, str, str, str]) -> DatasetSource:
    """MNIST-layout data: the four gzipped idx files under ``base_url``, with their MD5s in ``_IDX_FILES`` order."""
    return DatasetSource(folder=folder,
                         files=tuple(RemoteFile(base_url + f + ".gz", md5, f + ".gz") for f, md5 in zip(_IDX_FILES, md5s)),
                         required=_IDX_FILES)


SOURCES: dict[str, DatasetSource] = {
    "cifar10": DatasetSource(
        folder="cifar-10-batches-py",
        files=(RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz"),),
        required=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        extract_tar=True,
    ),
    "mnist": _idx_source("mnist", _MNIST, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                          "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion_mnist": _idx_source("fashion-mnist", _FASHION,
                                 ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                  "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "poisonlab"


def candidate_roots(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    roots: list[Path] = []
    if data_dir:
        roots.append(Path(data_dir))
    env = os.environ.get("POISONLAB_DATA")
    if env:
        roots.append(Path(env))
    roots.append(cache_dir())
    return roots


def _has_files(folder: Path, required: tuple[str, ...]) -> bool:
    return folder.is_dir() and all((folder / r).is_file() or (folder / f"{r}.gz").is_file() for r in required)


def find_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first folder holding ``name``'s files, or None.

    A root may be the dataset folder itself or its parent.
    """
    src = SOURCES[name]
    for root in candidate_roots(data_dir):
        for folder in (root / src.folder, root):
            if _has_files(folder, src.required):
                return folder
    return None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path, md5: str | None = None, progress: bool = True, timeout: float = 30) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5``; shows a progress bar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), disable=not progress, transient=True) as bar:
                task = bar.add_task(f"download {dest.name}", total=total)
                while block := r.read(1 << 16):
                    f.write(block)
                    bar.update(task, advance=len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {e}") from e
    if md5 is not None:
        got = md5sum(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); the file was discarded")
    os.replace(tmp, dest)
    return dest


def fetch_dataset(name: str, root: str | os.PathLike[str] | None = None, base_url: str | None = None,
                  progress: bool = True) -> Path:
    """Download ``name`` into ``root`` (default: the user cache dir) and return its folder.

    ``base_url`` replaces the official host (a mirror, or a local server in tests).
    """
    src = SOURCES[name]
    root = Path(root) if root else cache_dir()
    folder = root / src.folder
    for rf in src.files:
        url = base_url.rstrip("/") + "/" + rf.filename if base_url else rf.url
        if src.extract_tar:
            archive = download_file(url, root / rf.filename, rf.md5, progress)
            _safe_extract(archive, root)
            archive.unlink()
        else:
            download_file(url, folder / rf.filename, rf.md5, progress)
    if not _has_files(folder, src.required):
        raise DataError(f"{folder}: download finished but files {src.required} are not all there")
    return folder


def _safe_extract(archive: Path, root: Path) -> None:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            target = (root / m.name).resolve()
            # is_relative_to, not a string prefix: /data/cifar-evil starts with /data/cifar too
            if not target.is_relative_to(root.resolve()) or m.issym() or m.islnk():
                raise DataError(f"{archive}: refusing unsafe archive member {m.name!r}")
        tf.extractall(root, filter="data")


def missing_message(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    src = SOURCES[name]
    looked = ", ".join(str(r) for r in candidate_roots(data_dir))
    files = ", ".join(f.url for f in src.files)
    return (
        f"dataset {name!r} not found (looked in: {looked}). Put the folder {src.folder}/ with "
        f"{', '.join(src.required)} under one of these (or pass --data-dir / set POISONLAB_DATA), "
        f"or set download = true in the config's [dataset] (download=True in Python) to fetch {files}."
    )
