"""A damaged artifact cache (a truncated meta.json, arrays.npz or model.pt, a flipped byte) is reported with the
file's path and recomputed, never fatal, also when the same command runs again."""

import json
import warnings

import numpy as np
import pytest
import torch

from poisonlab.errors import CacheError
from poisonlab.experiments import parse_config
from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.runner import run_experiment


@pytest.fixture
def cache(tmp_path):
    c = ArtifactCache(tmp_path / "cache")
    torch.manual_seed(0)
    c.put("victim", "k", {"metrics": {"acc": 0.5}}, {"scores": np.arange(5000, dtype=np.float64)},
          model=torch.nn.Linear(40, 30))
    return c


def _flip_byte(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path, keep=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _tensor_offset(path):
    """Offset of a byte inside the largest tensor's data in a torch zip checkpoint."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = path.read_bytes()
    return info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little") + info.file_size // 2


@pytest.mark.parametrize("damage", [
    ("meta.json", _truncate), ("meta.json", lambda p: p.write_text("[1, 2]")),
    ("arrays.npz", _truncate), ("arrays.npz", lambda p: _flip_byte(p, p.stat().st_size // 2)),
    ("model.pt", _truncate), ("model.pt", lambda p: _flip_byte(p, _tensor_offset(p))),
])
def test_a_damaged_entry_is_reported_with_its_path_and_removed(cache, damage):
    name, hurt = damage
    f = cache.path("victim", "k") / name
    assert cache.has("victim", "k")
    hurt(f)
    fresh = ArtifactCache(cache.root)  # another process, nothing remembered
    for c in (cache, fresh):
        with pytest.warns(UserWarning, match=rf"{f}: damaged cache entry .*; removed, it will be recomputed$"):
            assert not c.has("victim", "k")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not c.has("victim", "k")  # gone: reported once, not on every look-up
            assert c.arrays("victim", "k") == {}
        cache.put("victim", "k", {"metrics": {"acc": 0.5}}, {"scores": np.arange(5000, dtype=np.float64)},
                  model=torch.nn.Linear(40, 30))
        assert c.has("victim", "k") and c.meta("victim", "k")["metrics"]["acc"] == 0.5
        assert c.arrays("victim", "k")["scores"][-1] == 4999 and c.state_dict("victim", "k")["weight"].shape == (30, 40)
        hurt(f)


def test_torch_alone_would_load_a_flipped_byte_silently(cache):
    """Why the cache checks model.pt's CRCs itself: torch.load does not."""
    f = cache.path("victim", "k") / "model.pt"
    before = torch.load(f, weights_only=True)["weight"].clone()
    _flip_byte(f, _tensor_offset(f))
    after = torch.load(f, weights_only=True)["weight"]
    assert not torch.equal(before, after)


def test_reading_an_entry_damaged_after_it_was_checked_is_a_cache_error(cache):
    d = cache.path("victim", "k")
    assert cache.has("victim", "k")
    (d / "arrays.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.warns(UserWarning, match="arrays.npz: damaged cache entry"):
        assert cache.arrays("victim", "k") == {}  # checked again: its size changed
    assert not (d / "meta.json").exists()
    cache.put("victim", "k", {"metrics": {}}, model=torch.nn.Linear(2, 2))
    (d / "meta.json").write_text("{")
    with pytest.raises(CacheError, match=rf"{d / 'meta.json'}: damaged cache entry .*; removed; run the command again"):
        cache.meta("victim", "k")
    cache.put("victim", "k", {"metrics": {}}, model=torch.nn.Linear(2, 2))
    (d / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CacheError, match=rf"{d / 'model.pt'}: damaged cache entry \(DataError: not a safe poisonlab checkpoint"):
        cache.state_dict("victim", "k")
    assert not cache.has("victim", "k")


def test_timings_of_the_wrong_shape_are_ignored(tmp_path):
    c = ArtifactCache(tmp_path)
    (tmp_path / "timings").mkdir()
    for i, text in enumerate(["[1, 2]", '{"seconds": "x"}', "{", '"s"']):
        (tmp_path / "timings" / f"t{i}.json").write_text(text)
        assert c.seconds(f"t{i}") is None


def test_a_cache_path_that_is_a_file_is_a_cache_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match=rf"{f}: the cache must be a directory"):
        ArtifactCache(f)


def test_a_grid_recomputes_damaged_entries_and_runs_again_cleanly(tmp_path):
    cfg = parse_config({"name": "damaged-cache", "dataset": {"name": "digits", "train_size": 200, "test_size": 60},
                        "training": {"epochs": 1, "batch_size": 64},
                        "attacks": [{"name": "random_flip", "rate": 0.1}], "plots": False})
    cache = tmp_path / "cache"
    run_experiment(cfg, tmp_path / "a", progress=False, log=lambda s: None, cache_dir=cache, report=False)
    meta = next(cache.glob("clean/*/meta.json"))
    arrays = next(cache.glob("poison/*/arrays.npz"))
    model = next(cache.glob("victim/*/model.pt"))
    _truncate(meta)
    _truncate(arrays)
    _truncate(model, 0.9)
    with pytest.warns(UserWarning) as rec:
        rows = run_experiment(cfg, tmp_path / "b", progress=False, log=lambda s: None, cache_dir=cache, report=False)
    assert [r.get("error") for r in rows] == [None, None]
    reported = " ".join(str(w.message) for w in rec)
    for f in (meta, arrays, model):
        assert f"{f}: damaged cache entry" in reported
    assert json.loads(meta.read_text())["metrics"]  # recomputed and whole again
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        again = run_experiment(cfg, tmp_path / "c", progress=False, log=lambda s: None, cache_dir=cache,
                               report=False)
    assert [r.get("error") for r in again] == [None, None]
