"""Carry a dataset folder to the device (GPU) machine, whose calls take at most 64 MiB each.

The device tool sends the working tree plus up to 8 ignored ``carry`` paths, 64 MiB in all, and
nothing can be fetched on that machine; ignored files already there stay between calls while the
machine is warm. CIFAR-10's canonical python pickles are 178 MB (133 MiB xz-compressed: natural
images do not compress much), so the full set cannot travel in one call. This script packs a
dataset folder into parts that each fit one call, and unpacks them there, byte for byte:

    # here (CPU): 3 parts of about 45 MB under .device-data/ (git-ignored)
    python benchmarks/device_data.py pack --data-dir ../shared/data --dataset cifar-10-batches-py --out .device-data

    # device: carry .device-data/p0 in a first call, .device-data/p1 in a second, ... (each call
    # within the machine's idle window), then in the last call
    python benchmarks/device_data.py unpack --src .device-data --dest .device-data/data

``unpack`` checks every file against the SHA-256 written at packing and refuses file names that
are not plain names (the manifest is read like any other input: nothing is written outside
``--dest``). ``benchmarks/gpu_figures.sh`` is the one prepared device script that uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

PART_LIMIT = 56 * 2**20
"""Bytes of compressed data per part: 64 MiB a call, less the working tree (about 2-3 MB) and the wheels."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(data_dir: Path, dataset: str, out: Path, part_limit: int = PART_LIMIT) -> list[Path]:
    """xz-compress each file of ``data_dir/dataset`` into parts ``out/p0, p1, ...`` of at most
    ``part_limit`` compressed bytes (a file larger than that gets a part of its own), each with a
    ``manifest.json`` (dataset, file name, SHA-256 and size of the original). Returns the parts."""
    src = data_dir / dataset
    if not _NAME.match(dataset) or not src.is_dir():
        raise SystemExit(f"pack: {src} is not a dataset folder (give --dataset as a plain folder name)")
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise SystemExit(f"pack: {src} holds no files")
    if any(out.glob("p[0-9]*")):
        raise SystemExit(f"pack: {out} already holds parts (p0, ...): remove them or give another --out")
    parts: list[list[dict]] = [[]]
    for f in files:
        raw = f.read_bytes()
        packed = lzma.compress(raw, preset=6)
        if parts[-1] and sum(e["xz_bytes"] for e in parts[-1]) + len(packed) > part_limit:
            parts.append([])
        d = out / f"p{len(parts) - 1}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{f.name}.xz").write_bytes(packed)
        parts[-1].append({"file": f.name, "sha256": _sha256(raw), "bytes": len(raw), "xz_bytes": len(packed)})
    written = []
    for k, entries in enumerate(parts):  # the manifests last: only now is the number of parts known
        d = out / f"p{k}"
        (d / "manifest.json").write_text(json.dumps({"dataset": dataset, "part": k, "parts": len(parts),
                                                     "files": entries}, indent=1))
        written.append(d)
    return written


def _manifest(part: Path) -> dict:
    path = part / "manifest.json"
    try:
        m = json.loads(path.read_text())
        ok = (isinstance(m, dict) and isinstance(m.get("dataset"), str) and _NAME.match(m["dataset"])
              and isinstance(m.get("parts"), int) and isinstance(m.get("files"), list)
              and all(isinstance(e, dict) and isinstance(e.get("file"), str) and _NAME.match(e["file"])
                      and isinstance(e.get("sha256"), str) for e in m["files"]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"unpack: {path} cannot be read as a manifest ({e})") from None
    if not ok:
        raise SystemExit(f"unpack: {path}: 'dataset' and each 'file' must be plain names, with a 'sha256' each")
    return m


def unpack(src: Path, dest: Path) -> Path:
    """Decompress every part under ``src`` into ``dest/<dataset>/``, checking each file's SHA-256 and
    that no part is missing. Returns the dataset folder."""
    parts = sorted(p for p in src.glob("p[0-9]*") if p.is_dir())
    if not parts:
        raise SystemExit(f"unpack: {src} holds no parts (p0, p1, ...)")
    manifests = [_manifest(p) for p in parts]
    datasets = {m["dataset"] for m in manifests}
    expected = manifests[0]["parts"]
    if len(datasets) != 1 or len(parts) != expected or any(m["parts"] != expected for m in manifests):
        raise SystemExit(f"unpack: {src} holds {len(parts)} part(s) of {sorted(datasets)}; the manifests "
                         f"say {expected}: carry every part before unpacking")
    target = dest / datasets.pop()
    target.mkdir(parents=True, exist_ok=True)
    for part, m in zip(parts, manifests):
        for e in m["files"]:
            xz = part / f"{e['file']}.xz"
            try:
                raw = lzma.decompress(xz.read_bytes())
            except (OSError, lzma.LZMAError) as err:
                raise SystemExit(f"unpack: {xz} cannot be decompressed ({err})") from None
            if _sha256(raw) != e["sha256"]:
                raise SystemExit(f"unpack: {xz} does not match the sha256 in {part / 'manifest.json'}")
            (target / e["file"]).write_bytes(raw)
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="compress a dataset folder into parts that fit one device call each")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--dataset", default="cifar-10-batches-py")
    p.add_argument("--out", type=Path, default=Path(".device-data"))
    p.add_argument("--part-mib", type=float, default=PART_LIMIT / 2**20)
    u = sub.add_parser("unpack", help="rebuild the dataset folder from every part, checking each file")
    u.add_argument("--src", type=Path, default=Path(".device-data"))
    u.add_argument("--dest", type=Path, default=Path(".device-data/data"))
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        if not 1 <= args.part_mib <= 60:
            raise SystemExit(f"--part-mib must be in [1, 60], got {args.part_mib}")
        for d in pack(args.data_dir, args.dataset, args.out, int(args.part_mib * 2**20)):
            size = sum(f.stat().st_size for f in d.iterdir())
            print(f"{d}: {size / 2**20:.1f} MiB")
    else:
        print(unpack(args.src, args.dest))


if __name__ == "__main__":
    sys.exit(main())
