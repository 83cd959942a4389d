"""Hand poisonlab hostile and careless inputs and classify what each one does: `python benchmarks/hostile_inputs.py`.

Each case builds its input in a fresh temporary folder, runs one command there in a subprocess (with a memory
and a time limit) and is classified:

- ``clear error``: non-zero exit, no traceback, an ``error:`` message of at most MAX_MESSAGE characters that names
  what the case expects (the file, the field, the limit);
- ``handled``: the case expects the command to go on: exit 0, output (the warning about what was skipped)
  naming what the case expects, and the case's check of the result passes (the secret file is not in the
  report, the damaged entry was recomputed, the 16-bit pixels were scaled);
- ``traceback``: "Traceback" in the output;
- ``silent``: exit 0 where an error was expected, or a handled case whose check of the result fails;
- ``misleading``: an error without a traceback whose message does not name what the case expects (or says what
  it must not, such as a flag that does not exist), or is too long;
- ``late error``: a clear error the issue wants before any work (``before_work``), given only after some runs
  were done and written;
- ``hang`` / ``memory``: killed by the time limit, or failed for want of memory.

The last line reads "N inputs, E clear errors, H handled correctly, 0 tracebacks, 0 silent" (E + H = N) when every
case behaves: "handled correctly" counts the cases where going on is right (the report skips a plot it must not
embed, the audit lists a bomb as unreadable), so it is a count of its own; any other outcome is appended to the
line with its count ("1 late error") and the exit status is non-zero.

Cases 1-26 are the defects of issue 15's first phase; the PHASE2 list adds its second phase (exit status on
failed runs, errors that must come before any work, paths and results files that are not what they seem,
umask, tables and --format output to a pipe). To add a case, write a builder that makes the input under
the folder it is given and returns the command line (arguments after ``python``), and add a ``Case`` to CASES.
``--only NAME`` (repeatable) runs some cases, ``--list`` names them all.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import pickle
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MAX_MESSAGE = 4000  # characters of error output a case may print and still count as clear
POISONLAB = ["-m", "poisonlab"]
Check = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class Case:
    """One hostile input.

    ``build(tmp)`` writes the input under ``tmp`` and returns the command line after ``python``.
    ``expect`` is ``"error"`` or ``"go on"``; ``names`` are what the error (or, going on, the output) must
    mention and ``absent`` what it must not; ``check(tmp)`` (going on only) returns None when the result is
    right, else what is wrong (the command's stdout and stderr are in ``tmp/.stdout`` and ``tmp/.stderr``).
    """

    name: str
    issue: str  # the item of issue 15 it reproduces
    build: Callable[[Path], list[str]]
    expect: str
    names: tuple[str, ...]
    check: Check | None = None
    absent: tuple[str, ...] = ()  # what the output must not say (a flag that does not exist, a cut cell)
    before_work: bool = False  # an error the issue wants before any work: nothing may be in tmp/out/results.json


# ------------------------------------------------------------------------------------------------ file builders
def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, rows: bytes = b"", depth: int = 8, color: int = 0) -> bytes:
    """PNG bytes from raw filtered rows; with no rows, a header that declares the size and nothing else."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _gray_png(pixels: np.ndarray) -> bytes:
    rows = b"".join(b"\0" + row.astype(np.uint8).tobytes() for row in pixels)
    return _png(pixels.shape[1], pixels.shape[0], rows)


def _image_folder(root: Path, per_class: int = 12, side: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(per_class):  # two classes a network can tell apart: dark and bright noise
            _write(root / f"class{c}" / f"{i}.png", _gray_png(rng.integers(0, 128, (side, side)) + 127 * c))
    return root


def _idx(path: Path, shape: tuple[int, ...], payload: bytes | None = None, code: int = 0x08,
         zeros_after_mib: int = 0) -> Path:
    """A gzipped idx file; ``zeros_after_mib`` appends that many MiB of zeros the header does not declare."""
    header = struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    if payload is None:
        payload = bytes(int(np.prod(shape, dtype=object)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + payload)
        zeros = bytes(1 << 20)
        for _ in range(zeros_after_mib):
            f.write(zeros)
    return path


def _mnist(root: Path, n: int = 100, images: Callable[[Path], Path] | None = None, labels: bytes | None = None,
           label_code: int = 0x08) -> Path:
    """MNIST's four idx files under ``root/mnist``: ``n`` training images (or what ``images(path)`` writes)."""
    d = root / "mnist"
    (images or (lambda p: _idx(p, (n, 28, 28))))(d / "train-images-idx3-ubyte.gz")
    labels = bytes(i % 10 for i in range(n)) if labels is None else labels
    _idx(d / "train-labels-idx1-ubyte.gz", (n,), labels, code=label_code)
    _idx(d / "t10k-images-idx3-ubyte.gz", (20, 28, 28))
    _idx(d / "t10k-labels-idx1-ubyte.gz", (20,), bytes(range(10)) * 2)
    return root


def _cifar(root: Path, labels: object = None, meta: object = None) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    batch = {b"data": np.zeros((20, 3072), np.uint8), b"labels": list(range(10)) * 2 if labels is None else labels}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps(batch, protocol=4))
    if meta is not None:
        (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def _config(tmp: Path, dataset: dict, name: str = "cfg.toml", **top: object) -> Path:
    """A small TOML experiment: one epoch, one attack, no defence."""
    ds = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dataset.items())
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in top.items())
    return _write(tmp / name, f'name = "hostile"\nplots = false\n{extra}\n[dataset]\n{ds}\n[training]\nepochs = 1\n'
                              'batch_size = 32\n[[attacks]]\nname = "random_flip"\nrate = 0.1\n')


def _run_data(tmp: Path, dataset: dict) -> list[str]:
    return POISONLAB + ["run", str(_config(tmp, dataset)), "--out", str(tmp / "out"), "--data-dir", str(tmp), "-q"]


# ------------------------------------------------------------------------------------------------ result checks
def _rows_without_errors(out: str) -> Check:
    def check(tmp: Path) -> str | None:
        f = tmp / out / "results.json"
        if not f.is_file():
            return f"no {f}"
        errors = [r.get("error") for r in json.loads(f.read_text()) if r.get("error")]
        return f"runs failed: {errors}" if errors else None
    return check


def _report_free_of(secret: str) -> Check:
    def check(tmp: Path) -> str | None:
        page = (tmp / "results" / "report.html").read_text()
        data = (tmp / secret).read_bytes()
        for chunk in page.split("base64,")[1:]:
            if base64.b64decode(chunk.split('"')[0]) == data:
                return f"report.html embeds {secret}"
        return None
    return check


# -------------------------------------------------------------------------------------------------- the cases
def _results_dir(tmp: Path, plots: dict) -> Path:
    out = tmp / "results"
    _write(out / "results.json", json.dumps([{"run": "r0", "attack": "none", "defense": "none", "seed": 0,
                                              "clean_acc": 0.9}]))
    _write(out / "runs" / "r0.json", json.dumps({"plots": plots}))
    return out


def report_disclosure(tmp: Path) -> list[str]:
    _write(tmp / "passwd", "root:x:0:0:root:/root:/bin/bash\n")
    out = _results_dir(tmp, {"history": str(tmp / "passwd"), "confusion": "../passwd"})
    return POISONLAB + ["report", str(out)]


def report_symlink(tmp: Path) -> list[str]:
    _write(tmp / "private.png", _gray_png(np.zeros((4, 4))))
    out = _results_dir(tmp, {"history": "plots/link.png"})
    (out / "plots").mkdir()
    (out / "plots" / "link.png").symlink_to(tmp / "private.png")
    return POISONLAB + ["report", str(out)]


def report_not_png(tmp: Path) -> list[str]:
    out = _results_dir(tmp, {"history": "runs/r0.json"})
    return POISONLAB + ["report", str(out)]


def _report_json_not_embedded(tmp: Path) -> str | None:
    page = (tmp / "results" / "report.html").read_text()
    return "report.html embeds a file" if "base64," in page else None


def yaml_alias_bomb(tmp: Path) -> list[str]:
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    _write(tmp / "bomb.yaml", "\n".join(lines + ["seeds: *a8"]) + "\n")  # 10^9 seeds once expanded
    return POISONLAB + ["run", str(tmp / "bomb.yaml"), "--out", str(tmp / "out"), "--dry-run"]


def yaml_deep(tmp: Path) -> list[str]:
    _write(tmp / "deep.yaml", "seeds: " + "[" * 100_000 + "]" * 100_000 + "\n")
    return POISONLAB + ["run", str(tmp / "deep.yaml"), "--dry-run"]


def toml_deep(tmp: Path) -> list[str]:
    _write(tmp / "deep.toml", "seeds = " + "[" * 100_000 + "]" * 100_000 + "\n")
    return POISONLAB + ["run", str(tmp / "deep.toml"), "--dry-run"]


def huge_value(tmp: Path) -> list[str]:
    _write(tmp / "big.toml", 'seeds = ["' + "x" * 500_000 + '"]\n')
    return POISONLAB + ["run", str(tmp / "big.toml"), "--dry-run"]


def many_errors(tmp: Path) -> list[str]:
    _write(tmp / "many.toml", "".join(f"key_{i} = {i}\n" for i in range(5000)))
    return POISONLAB + ["run", str(tmp / "many.toml"), "--dry-run"]


def huge_file(tmp: Path) -> list[str]:
    _write(tmp / "huge.toml", "# padding\n" * 300_000)
    return POISONLAB + ["run", str(tmp / "huge.toml"), "--dry-run"]


def non_utf8(tmp: Path) -> list[str]:
    _write(tmp / "latin1.toml", 'name = "caf\xe9"\n'.encode("latin-1"))
    return POISONLAB + ["run", str(tmp / "latin1.toml"), "--dry-run"]


def idx_bomb(mib: int) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        # the issue's case: a header for 1,000 images, then GiBs of zeros (a few MB once gzipped)
        _mnist(tmp, 1000, images=lambda p: _idx(p, (1000, 28, 28), zeros_after_mib=mib))
        return _run_data(tmp, {"name": "mnist"})
    return build


def idx_overflow(tmp: Path) -> list[str]:
    _mnist(tmp, images=lambda p: _idx(p, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), payload=bytes(64)))
    return _run_data(tmp, {"name": "mnist"})


def mnist_zero(tmp: Path) -> list[str]:
    _mnist(tmp, 0)
    return _run_data(tmp, {"name": "mnist"})


def mnist_float_labels(tmp: Path) -> list[str]:
    _mnist(tmp, labels=np.arange(100, dtype=">f4").tobytes(), label_code=0x0D)
    return _run_data(tmp, {"name": "mnist"})


def cifar_labels(labels: object) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        _cifar(tmp, labels=labels)
        return _run_data(tmp, {"name": "cifar10"})
    return build


def cifar_meta(meta: object) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        _cifar(tmp, meta=meta)
        return _run_data(tmp, {"name": "cifar10"})
    return build


def folder_png_bomb(tmp: Path) -> list[str]:
    _image_folder(tmp / "imgs")
    _write(tmp / "imgs" / "class0" / "bomb.png", _png(20000, 20000))
    return POISONLAB + ["run", str(_config(tmp, {"name": "folder", "path": str(tmp / "imgs"), "image_size": 8})),
                        "--out", str(tmp / "out"), "-q"]


def audit_png_bomb(tmp: Path) -> list[str]:
    _image_folder(tmp / "imgs", per_class=16)
    _write(tmp / "imgs" / "class1" / "bomb.png", _png(20000, 20000))
    return POISONLAB + ["audit", str(tmp / "imgs"), "--out", str(tmp / "audit"), "--folds", "2", "--epochs", "1",
                        "--image-size", "8", "-q"]


def _audit_lists_bomb(tmp: Path) -> str | None:
    files = [p for p in (tmp / "audit").rglob("*") if p.is_file()]
    return None if any("bomb.png" in p.read_text(errors="replace") for p in files) else "bomb.png not listed"


def png_16bit(tmp: Path) -> list[str]:
    values = np.array([[0, 1000], [32768, 65535]], np.uint16)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    _write(tmp / "imgs" / "a" / "gray16.png", _png(2, 2, rows, depth=16))
    code = ("import json; from poisonlab.data import read_image_folder; "
            f"s = read_image_folder({str(tmp / 'imgs')!r}, size=2, channels=1); "
            "got = s.images[0, ..., 0].ravel().tolist(); print('read pixels', got); "
            f"open({str(tmp / 'pixels.json')!r}, 'w').write(json.dumps(got))")
    return ["-c", code]


def _pixels_scaled(tmp: Path) -> str | None:
    got = json.loads((tmp / "pixels.json").read_text())
    return None if got == [0, 4, 128, 255] else f"16-bit pixels 0, 1000, 32768, 65535 read as {got}"


def _cache_case(target: str, keep: float) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = _config(tmp, {"name": "digits", "train_size": 200, "test_size": 60})
        first = subprocess.run([sys.executable, *POISONLAB, "run", str(cfg), "--out", str(tmp / "first"), "--cache",
                                str(tmp / "cache"), "-q"], capture_output=True, text=True, cwd=tmp)
        if first.returncode:
            raise RuntimeError(f"setting up the cache failed: {first.stderr[-2000:]}")
        f = next((tmp / "cache").glob(target))
        raw = f.read_bytes()
        f.write_bytes(raw[: int(len(raw) * keep)])
        return POISONLAB + ["run", str(cfg), "--out", str(tmp / "out"), "--cache", str(tmp / "cache"), "-q"]
    return build


def cache_is_a_file(tmp: Path) -> list[str]:
    cfg = _config(tmp, {"name": "digits", "train_size": 200, "test_size": 60})
    _write(tmp / "cachefile", "x")
    return POISONLAB + ["run", str(cfg), "--out", str(tmp / "out"), "--cache", str(tmp / "cachefile"), "-q"]


CASES: list[Case] = [
    Case("report: plots name /etc-like and ../ files", "1", report_disclosure, "go on",
         ("r0", "plots.history", "plots.confusion", "absolute path", "outside the results folder"),
         _report_free_of("passwd")),
    Case("report: plot symlinked outside the folder", "1", report_symlink, "go on",
         ("plots.history", "outside the results folder"), _report_free_of("private.png")),
    Case("report: plot that is not a PNG", "1", report_not_png, "go on", ("plots.history", "not a PNG"),
         _report_json_not_embedded),
    Case("config: YAML alias bomb, nine levels", "2", yaml_alias_bomb, "error", ("bomb.yaml", "alias", "line 2")),
    Case("config: YAML nested 100,000 deep", "2", yaml_deep, "error", ("deep.yaml", "nested more than")),
    Case("config: TOML nested 100,000 deep", "2", toml_deep, "error", ("deep.toml", "nested more than")),
    Case("config: a 500 kB value in a field", "2", huge_value, "error", ("big.toml", "seeds.0")),
    Case("config: 5,000 unknown keys", "2", many_errors, "error", ("many.toml", "unknown key", "more")),
    Case("config: 3 MB file", "2", huge_file, "error", ("huge.toml", "at most")),
    Case("config: not UTF-8", "7", non_utf8, "error", ("latin1.toml", "UTF-8", "line 1")),
    Case("mnist: gzip bomb (1,000 images declared, GiBs inside)", "3", idx_bomb(3072), "error",
         ("train-images-idx3-ubyte.gz", "more data than its header")),
    Case("mnist: idx header whose size overflows", "7", idx_overflow, "error",
         ("train-images-idx3-ubyte.gz", "header declares", "limit")),
    Case("mnist: zero images", "7", mnist_zero, "error", ("train-images-idx3-ubyte.gz", "0 images")),
    Case("mnist: float labels", "8", mnist_float_labels, "error",
         ("train-labels-idx1-ubyte.gz", "labels must be integers in [0, 9]", "float32")),
    Case("cifar: string labels", "7", cifar_labels(["cat"] * 20), "error", ("data_batch_1", "'labels'", "[0, 9]")),
    Case("cifar: 2-D labels", "7", cifar_labels([[0, 1]] * 20), "error", ("data_batch_1", "'labels'", "[0, 9]")),
    Case("cifar: float labels", "8", cifar_labels([0.5] * 20), "error", ("data_batch_1", "'labels'", "float")),
    Case("cifar: bool labels", "8", cifar_labels([True] * 20), "error", ("data_batch_1", "'labels'", "bool")),
    Case("cifar: label_names as an array", "7", cifar_meta({b"label_names": np.array([b"x"] * 10)}), "error",
         ("batches.meta", "'label_names'", "numpy array")),
    Case("folder dataset: 20000x20000 PNG", "3", folder_png_bomb, "go on", ("bomb.png", "unreadable"),
         _rows_without_errors("out")),
    Case("audit: 20000x20000 PNG", "3", audit_png_bomb, "go on", ("1 unreadable",), _audit_lists_bomb),
    Case("folder: 16-bit PNG", "8", png_16bit, "go on", ("read pixels",), _pixels_scaled),
    Case("cache: truncated clean/*/meta.json", "4", _cache_case("clean/*/meta.json", 0.5), "go on",
         ("meta.json: damaged cache entry",), _rows_without_errors("out")),
    Case("cache: truncated poison/*/arrays.npz", "4", _cache_case("poison/*/arrays.npz", 0.5), "go on",
         ("arrays.npz: damaged cache entry",), _rows_without_errors("out")),
    Case("cache: truncated victim/*/model.pt", "4", _cache_case("victim/*/model.pt", 0.9), "go on",
         ("model.pt: damaged cache entry",), _rows_without_errors("out")),
    Case("cache: --cache names a file", "5", cache_is_a_file, "error", ("cachefile", "must be a directory")),
]


# ------------------------------------------------------------------------- phase 2: failed runs, late errors
TINY = {"name": "digits", "train_size": 200, "test_size": 60}


def _run_cfg(text_or_cfg: Path, tmp: Path, *extra: str) -> list[str]:
    return POISONLAB + ["run", str(text_or_cfg), "--out", str(tmp / "out"), "-q", *extra]


def seeds(value: int) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return _run_cfg(_config(tmp, TINY, seeds=[value]), tmp)
    return build


def mnist_1x1(tmp: Path) -> list[str]:
    _mnist(tmp)
    return _run_data(tmp, {"name": "mnist", "image_size": 1})


def dry_run_missing_dataset(tmp: Path) -> list[str]:
    return _run_cfg(_config(tmp, {"name": "mnist", "data_dir": str(tmp / "nodata")}), tmp, "--dry-run")


def mnist_cnn_on_digits(tmp: Path) -> list[str]:
    cfg = _config(tmp, TINY)
    cfg.write_text(cfg.read_text() + '[model]\nname = "mnist_cnn"\n')
    return _run_cfg(cfg, tmp)


def strip_small_clean_set(tmp: Path) -> list[str]:
    # 200 images x clean_fraction 0.05 = 10 trusted images; STRIP needs 4 per class of 10
    cfg = _config(tmp, TINY)
    cfg.write_text(cfg.read_text() + '[[defenses]]\nname = "strip"\n')
    return _run_cfg(cfg, tmp)


def empty_config(tmp: Path) -> list[str]:
    _write(tmp / "empty.toml", "")
    return _run_cfg(tmp / "empty.toml", tmp)


def run_out_is_a_file(tmp: Path) -> list[str]:
    _write(tmp / "out", "keep me")
    return _run_cfg(_config(tmp, TINY), tmp)


def _file_kept(tmp: Path) -> str | None:
    return None if (tmp / "out").read_text() == "keep me" else "the file named by --out was overwritten"


def audit_args(*args: str, out: str = "audit") -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        _image_folder(tmp / "imgs")
        if out == "file":
            _write(tmp / "file", "keep me")
        target = {"file": tmp / "file", "inside": tmp / "imgs" / "audit"}.get(out, tmp / out)
        return POISONLAB + ["audit", str(tmp / "imgs"), "--out", str(target), "--folds", "2", "--epochs", "1",
                            "-q", *args]
    return build


def audit_formula_class(tmp: Path) -> list[str]:
    _image_folder(tmp / "imgs", per_class=16)
    (tmp / "imgs" / "class0").rename(tmp / "imgs" / "=1+2")
    return POISONLAB + ["audit", str(tmp / "imgs"), "--out", str(tmp / "audit"), "--folds", "2", "--epochs", "1",
                        "--image-size", "8", "-q"]


def _csv_neutralised(tmp: Path) -> str | None:
    import csv

    with open(tmp / "audit" / "suspicious.csv", newline="") as f:
        cells = [c for row in csv.reader(f) for c in row]
    raw = [c for c in cells if c[:1] in ("=", "+", "@")]
    if raw:
        return f"suspicious.csv holds cells a spreadsheet evaluates: {raw[:3]}"
    return None if any(c.startswith("'=1+2") for c in cells) else "the class =1+2 is not in suspicious.csv"


def _results(tmp: Path, text: str, folder: str = "results") -> Path:
    _write(tmp / folder / "results.json", text)
    return tmp / folder


def report_on(text: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        return POISONLAB + ["report", str(_results(tmp, text))]
    return build


def report_markup_path(tmp: Path) -> list[str]:
    row = {"run": "a[/b]", "dataset": "digits", "model": "fastnet", "training": "train", "attack": "none",
           "defense": "none", "seed": 0, "clean_acc": 0.9}
    return POISONLAB + ["report", str(_results(tmp, json.dumps([row]), "r[/x]"))]


def _report_written(folder: str) -> Check:
    def check(tmp: Path) -> str | None:
        return None if (tmp / folder / "report.html").is_file() else f"no {folder}/report.html"
    return check


def run_markup_path(tmp: Path) -> list[str]:
    return POISONLAB + ["run", str(tmp / "c[/x].toml"), "--dry-run"]


def federated_nan(tmp: Path) -> list[str]:
    _write(tmp / "fed.toml", 'name = "fed"\n[malicious]\nfraction = nan\n')
    return POISONLAB + ["federated", str(tmp / "fed.toml"), "--out", str(tmp / "out")]


def umask_report(tmp: Path) -> list[str]:
    row = {"run": "r0", "dataset": "digits", "model": "fastnet", "training": "train", "attack": "none",
           "defense": "none", "seed": 0, "clean_acc": 0.9}
    out = _results(tmp, json.dumps([row]))
    code = ("import os, runpy, sys; os.umask(0o027); "
            f"sys.argv = ['poisonlab', 'report', {str(out)!r}]; runpy.run_module('poisonlab', run_name='__main__')")
    return ["-c", code]


def _modes_follow_umask(tmp: Path) -> str | None:
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp / "results").iterdir() if f.suffix in (".html", ".md")}
    bad = {k: v for k, v in modes.items() if v != oct(0o640)}
    return f"under umask 027, modes {bad} (expected 0o640)" if bad or not modes else None


def list_to_pipe(tmp: Path) -> list[str]:
    return POISONLAB + ["list"]


def run_summary_to_pipe(tmp: Path) -> list[str]:
    cfg = _config(tmp, TINY)
    cfg.write_text(cfg.read_text().replace('name = "random_flip"\nrate = 0.1',
                                           'name = "badnets"\nsize = 2\nrate = 0.1\ncorner = "bottom-right"'))
    return _run_cfg(cfg, tmp)


def run_format(fmt: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = _config(tmp, TINY)
        return POISONLAB + ["run", str(cfg), "--out", str(tmp / "out"), "--format", fmt]  # progress bars on
    return build


def _stdout_parses(fmt: str) -> Check:
    def check(tmp: Path) -> str | None:
        import csv

        text = (tmp / ".stdout").read_text()
        try:
            rows = json.loads(text) if fmt == "json" else list(csv.DictReader(text.splitlines()))
        except ValueError as e:
            return f"stdout is not {fmt}: {e}"
        runs = [r.get("run") for r in rows] if isinstance(rows, list) else []
        return None if runs == ["none+none+s0", "random_flip(rate=0.1)+none+s0"] else f"stdout rows: {runs}"
    return check


PLUGIN = """from poisonlab.attacks.label_flip import RandomLabelFlip


class Broken(RandomLabelFlip):
    def _poison(self, train, seed, context):
        raise RuntimeError("the plug-in attack broke")
"""


def a_run_fails(tmp: Path) -> list[str]:
    _write(tmp / "brokenattack.py", PLUGIN)
    cfg = _config(tmp, TINY)
    cfg.write_text(cfg.read_text().replace('name = "random_flip"', 'name = "brokenattack:Broken"'))
    return _run_cfg(cfg, tmp)


PHASE2: list[Case] = [
    Case("run: seeds = [2^64 + 1]", "5", seeds(2**64 + 1), "error", ("cfg.toml", "seeds", "4294967295"),
         before_work=True),
    Case("run: seeds = [-1]", "6", seeds(-1), "error", ("cfg.toml", "seeds", "4294967295"), before_work=True),
    Case("run: MNIST at 1x1", "5", mnist_1x1, "error", ("cfg.toml", "dataset.image_size", "greater than or equal to 4"),
         before_work=True),
    Case("run: a run fails mid-grid (exit status 1)", "5", a_run_fails, "error",
         ("the plug-in attack broke", "1 run(s) failed")),
    Case("run --dry-run: dataset missing", "5", dry_run_missing_dataset, "error", ("mnist", "download = true"),
         absent=("--download",)),
    Case("run: mnist_cnn on 8x8 digits", "6", mnist_cnn_on_digits, "error", ("mnist_cnn", "8x8x1"),
         before_work=True),
    Case("run: STRIP with too small a clean set", "6", strip_small_clean_set, "error", ("strip", "clean set"),
         before_work=True),
    Case("run: empty config", "6", empty_config, "error", ("empty.toml", "empty"), before_work=True),
    Case("run: --out names a file", "7", run_out_is_a_file, "error", ("--out", "not a directory")),
    Case("audit: --out names a file", "7", audit_args(out="file"), "error", ("--out", "not a directory")),
    Case("audit: --image-size 100000", "7", audit_args("--image-size", "100000"), "error",
         ("--image-size", "[4, 1024]")),
    Case("audit: --image-size 0", "7", audit_args("--image-size", "0"), "error", ("--image-size", "[4, 1024]")),
    Case("audit: --out inside the audited folder", "8", audit_args(out="inside"), "error",
         ("inside the audited folder",)),
    Case("audit: a class folder named =1+2", "8", audit_formula_class, "go on", ("images flagged",),
         _csv_neutralised),
    Case("report: [/x] in the folder path", "7", report_markup_path, "go on", ("r[/x]",), _report_written("r[/x]")),
    Case("run: [/x] in a config path", "7", run_markup_path, "error", ("c[/x].toml", "not found")),
    Case("report: truncated results.json", "7", report_on('[{"run": "r0", "clean_'), "error", ("results.json",)),
    Case("report: results.json is {}", "7", report_on("{}"), "error", ("results.json",)),
    Case("report: results.json is [1,2,3]", "7", report_on("[1, 2, 3]"), "error", ("results.json",)),
    Case("federated: malicious.fraction = nan", "7", federated_nan, "error", ("fraction", "finite")),
    Case("output files follow the umask (027)", "10", umask_report, "go on", ("wrote",), _modes_follow_umask),
    Case("list: tables to a pipe are whole", "10", list_to_pipe, "go on", ("corner='bottom-right'",),
         absent=("…",)),
    Case("run: summary table to a pipe is whole", "10", run_summary_to_pipe, "go on",
         ("badnets(corner=bottom-right,rate=0.1,size=2)",), _rows_without_errors("out"), absent=("…",)),
    Case("run --format json: stdout is JSON alone", "10", run_format("json"), "go on", ("plan:",),
         _stdout_parses("json")),
    Case("run --format csv: stdout is CSV alone", "10", run_format("csv"), "go on", ("plan:",),
         _stdout_parses("csv")),
]
CASES += PHASE2


# ------------------------------------------------------------------------------------------------- the harness
@dataclass(frozen=True)
class Outcome:
    case: Case
    kind: str  # clear error | handled | traceback | silent | misleading | hang | memory
    detail: str
    seconds: float


def _limit_memory(gib: float) -> Callable[[], None]:
    def set_limit() -> None:
        limit = int(gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return set_limit


_GRID_STATUS = re.compile(r"\[\d+/\d+ done[^\]]*\]\s*")  # "[1/2 done, ..., 3s elapsed, ~0s left]": times


def _first_line(text: str) -> str:
    text = _GRID_STATUS.sub("", text)  # the log of this script records outcomes, never timings
    lines = [line for line in text.splitlines() if line.strip()]
    hit = next((line for line in lines if "error:" in line or "Error" in line), lines[-1] if lines else "")
    return hit.strip()[:200]


def classify(case: Case, rc: int, output: str, problem: str | None, worked: bool = False) -> tuple[str, str]:
    """What a finished command did, as (kind, detail); see the module docstring. ``worked``: the command
    wrote result rows before it failed (a ``late error`` when the case wants the refusal before any work)."""
    if "Traceback" in output:
        return "traceback", _first_line(output.split("Traceback")[-1])
    if "MemoryError" in output or "Cannot allocate memory" in output:
        return "memory", _first_line(output)
    missing = [n for n in case.names if n not in output]
    wrong = [n for n in case.absent if n in output]
    if wrong and (case.expect == "go on" or rc != 0):
        return ("misleading" if case.expect == "error" else "silent"), f"says {wrong}: {_first_line(output)}"
    if case.expect == "error":
        if rc == 0:
            return "silent", "exit 0"
        if missing or len(output) > MAX_MESSAGE:
            why = f"does not name {missing}" if missing else f"{len(output)} characters of output"
            return "misleading", f"{why}: {_first_line(output)}"
        if case.before_work and worked:
            return "late error", f"refused only after some work: {_first_line(output)}"
        return "clear error", _first_line(output)
    if rc != 0:
        return "misleading", f"exit {rc}: {_first_line(output)}"
    if problem:
        return "silent", problem
    if missing:
        return "silent", f"no warning naming {missing}"
    return "handled", next((line.strip()[:200] for line in _GRID_STATUS.sub("", output).splitlines()
                              if all(n in line for n in case.names[:1])), "")


def run_case(case: Case, timeout: float, memory_gib: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        tmp = Path(d)
        argv = case.build(tmp)
        env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp, env=env,
                               timeout=timeout, preexec_fn=_limit_memory(memory_gib))
        except subprocess.TimeoutExpired:
            return Outcome(case, "hang", f"no answer in {timeout:.0f} s", time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        output = r.stdout + r.stderr
        (tmp / ".stdout").write_text(r.stdout)
        (tmp / ".stderr").write_text(r.stderr)
        problem = case.check(tmp) if case.check is not None and r.returncode == 0 else None
        kind, detail = classify(case, r.returncode, output, problem, (tmp / "out" / "results.json").exists())
        return Outcome(case, kind, detail, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run only cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and stop")
    ap.add_argument("--timeout", type=float, default=180, help="seconds a case may take")
    ap.add_argument("--memory-gib", type=float, default=4, help="address-space limit of each command")
    a = ap.parse_args()
    cases = [c for c in CASES if not a.only or any(s in c.name for s in a.only)]
    if a.list:
        for c in cases:
            print(f"#{c.issue:>2}  {c.expect:<8} {c.name}")
        return
    outcomes = []
    for c in cases:
        o = run_case(c, a.timeout, a.memory_gib)
        outcomes.append(o)
        print(f"{o.kind:<12} #{c.issue:<2} {c.name}: {o.detail}", flush=True)
    count = {k: sum(o.kind == k for o in outcomes) for k in
             ("clear error", "handled", "traceback", "silent", "misleading", "late error", "hang", "memory")}
    others = ", ".join(f"{n} {k}" for k, n in count.items() if n and k not in ("clear error", "handled",
                                                                              "traceback", "silent"))
    print(f"{len(outcomes)} inputs, {count['clear error']} clear errors, {count['handled']} handled correctly, "
          f"{count['traceback']} tracebacks, {count['silent']} silent" + (f", {others}" if others else ""))
    if count["clear error"] + count["handled"] != len(outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
