"""benchmarks/device_data.py: a dataset folder packed into parts that fit one device call, unpacked byte for byte."""

import json

import numpy as np
import pytest

from helpers import load_benchmark

D = load_benchmark("device_data")


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "data" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
        (src / name).write_bytes(rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    return src


def test_round_trip_splits_into_parts_under_the_limit(folder, tmp_path):
    parts = D.pack(folder.parent, folder.name, tmp_path / "dd", part_limit=100_000)
    with pytest.raises(SystemExit, match="already holds parts"):  # a second pack never mixes with the first
        D.pack(folder.parent, folder.name, tmp_path / "dd", part_limit=100_000)
    # random bytes do not compress: about 40 kB each, so two files a part at most
    assert len(parts) >= 2
    for p in parts:
        assert sum(f.stat().st_size for f in p.glob("*.xz")) <= 100_000 or len(list(p.glob("*.xz"))) == 1
    out = D.unpack(tmp_path / "dd", tmp_path / "there")
    assert out.name == folder.name
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in folder.iterdir())
    for f in folder.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()


def test_missing_part_tampered_file_and_hostile_names_are_refused(folder, tmp_path):
    parts = D.pack(folder.parent, folder.name, tmp_path / "dd", part_limit=100_000)
    last = parts[-1]
    moved = tmp_path / "aside"
    last.rename(moved)
    with pytest.raises(SystemExit, match="carry every part"):
        D.unpack(tmp_path / "dd", tmp_path / "there")
    moved.rename(last)

    xz = next(last.glob("*.xz"))
    xz.write_bytes(D.lzma.compress(b"not the original"))
    with pytest.raises(SystemExit, match="does not match the sha256"):
        D.unpack(tmp_path / "dd", tmp_path / "there")

    m = json.loads((last / "manifest.json").read_text())
    m["files"][0]["file"] = "../../escaped"
    (last / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SystemExit, match="plain names"):
        D.unpack(tmp_path / "dd", tmp_path / "there")
    assert not (tmp_path / "escaped").exists()
    (last / "manifest.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot be read as a manifest"):
        D.unpack(tmp_path / "dd", tmp_path / "there")


def test_pack_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(SystemExit, match="not a dataset folder"):
        D.pack(tmp_path, "../etc", tmp_path / "dd")
    with pytest.raises(SystemExit, match="not a dataset folder"):
        D.pack(tmp_path, "missing", tmp_path / "dd")
