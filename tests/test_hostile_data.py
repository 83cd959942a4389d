"""Dataset files built to hurt: decompression bombs, headers that lie, labels of the wrong type, images too large
to decode. Each is one DataError naming the file and field (or, in an image folder, one unreadable entry), never a
traceback, a memory blow-up or a silently wrong result."""

import gzip
import pickle
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from poisonlab.data import load_dataset, read_cifar10, read_idx, read_image_folder, read_mnist_like
from poisonlab.data.safe_pickle import safe_load
from poisonlab.errors import DataError, UnsafePickleError


# ----------------------------------------------------------------------------------------------------------- idx
def _idx(path, shape, payload=None, code=0x08, gz=True, extra=b""):
    header = struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    if payload is None:
        payload = bytes(int(np.prod(shape, dtype=object)) * np.dtype(_ITEM[code]).itemsize)
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(header + payload)
        for _ in range(len(extra) and 64):
            f.write(extra)
    return path


_ITEM = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def test_idx_bomb_is_refused_after_reading_at_most_the_header_size(tmp_path):
    # header: 10 images of 28x28 (7,840 bytes); then 64 MiB of zeros, a few hundred kB once gzipped
    f = _idx(tmp_path / "train-images-idx3-ubyte.gz", (10, 28, 28), extra=bytes(1 << 20))
    assert f.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: .*more data than its header"):
            read_idx(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_idx_header_whose_size_overflows_is_refused_unread(tmp_path):
    f = _idx(tmp_path / "big.gz", (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), payload=bytes(16))
    big = 0xFFFFFFFF ** 3
    with pytest.raises(DataError, match=rf"big\.gz: idx header declares shape .* \({big} bytes\), more than"):
        read_idx(f)
    with pytest.raises(DataError, match="more than the 1000-byte limit"):
        read_idx(_idx(tmp_path / "small.gz", (10, 10, 11)), max_bytes=1000)


def test_idx_truncated_or_padded_names_both_sizes(tmp_path):
    f = _idx(tmp_path / "t.gz", (3, 4, 4), payload=bytes(40))
    with pytest.raises(DataError, match=r"t\.gz: idx header says shape \(3, 4, 4\) \(48 bytes\) but the file holds 40"):
        read_idx(f)
    g = _idx(tmp_path / "plain", (3, 4, 4), payload=bytes(50), gz=False)
    with pytest.raises(DataError, match="more data than its header"):
        read_idx(g)
    assert read_idx(_idx(tmp_path / "ok", (3, 4, 4), gz=False)).shape == (3, 4, 4)


def _mnist(folder, n=3, labels=None, label_code=0x08):
    folder.mkdir(exist_ok=True)
    _idx(folder / "train-images-idx3-ubyte.gz", (n, 4, 4))
    lab = np.arange(n) % 10 if labels is None else np.asarray(labels)
    _idx(folder / "train-labels-idx1-ubyte.gz", (len(lab),), np.asarray(lab, _ITEM[label_code]).tobytes(),
         code=label_code)
    return folder


def test_mnist_with_zero_images_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: holds 0 images"):
        read_mnist_like(_mnist(tmp_path / "m", n=0))


@pytest.mark.parametrize("labels,code,match", [
    ([0.0, 1.0, 2.0], 0x0D, r"labels must be integers in \[0, 9\], found float32"),
    ([0, -1, 2], 0x09, r"labels must lie in \[0, 9\], found \[-1, 2\]"),
    ([0, 1, 12], 0x08, r"labels must lie in \[0, 9\], found \[0, 12\]"),
])
def test_mnist_labels_of_the_wrong_type_or_range_are_refused(tmp_path, labels, code, match):
    with pytest.raises(DataError, match=rf"train-labels-idx1-ubyte\.gz: {match}"):
        read_mnist_like(_mnist(tmp_path / "m", labels=labels, label_code=code))


def test_small_valid_mnist_reads(tmp_path):
    s = read_mnist_like(_mnist(tmp_path / "m", n=5))
    assert s.images.shape == (5, 4, 4, 1) and s.labels.tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------------- CIFAR
def _cifar(folder, labels, meta=None, n=4, data=None):
    folder.mkdir(exist_ok=True)
    batch = {b"data": np.zeros((n, 3072), np.uint8) if data is None else data, b"labels": labels}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    if meta is not None:
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return folder


@pytest.mark.parametrize("labels", [
    ["a", "b", "c", "d"], ["1", "2", "3", "4"], [[0, 1], [1, 2], [2, 3], [3, 4]], np.zeros((4, 2), np.int64),
    [0.5, 1.7, 2.2, 3.9], [0.0, 1.0, 2.0, 3.0], np.array([0.0, 1.0, 2.0, 3.0]), [True, False, True, False],
    np.array([True, False, True, False]), None, b"\x00\x01\x02\x03", [0, 1, None, 3], 7,
])
def test_cifar_labels_that_are_not_integers_are_refused_never_cast(tmp_path, labels):
    with pytest.raises(DataError, match=r"test_batch: field 'labels' must be a list of 4 integers in \[0, 9\]"):
        read_cifar10(_cifar(tmp_path / "c", labels), "test")


def test_cifar_integer_labels_as_list_or_array_read(tmp_path):
    for labels in ([0, 1, 2, 9], np.array([0, 1, 2, 9], np.int64), np.array([0, 1, 2, 9], np.uint8)):
        s = read_cifar10(_cifar(tmp_path / "c", labels), "test")
        assert s.labels.tolist() == [0, 1, 2, 9]


@pytest.mark.parametrize("meta,match", [
    ({b"label_names": np.array([b"a"] * 10)}, "found a numpy array"),
    ({b"label_names": [b"a", b"b"]}, "found 2"),
    ({b"label_names": list(range(10))}, "found int"),
    ({b"label_names": [b"\xff\xfe"] + [bytes([65 + i]) for i in range(9)]}, "not UTF-8"),
    ({b"label_names": [b"a"] * 10}, "'a' more than once"),
    ([1, 2], "expected a dict, found list"),
])
def test_cifar_label_names_of_the_wrong_shape_are_refused(tmp_path, meta, match):
    with pytest.raises(DataError, match=rf"batches\.meta: .*{match}"):
        read_cifar10(_cifar(tmp_path / "c", [0, 1, 2, 3], meta=meta), "test")


def test_cifar_meta_names_are_used(tmp_path):
    names = [f"c{i}".encode() for i in range(10)]
    s = read_cifar10(_cifar(tmp_path / "c", [0, 1, 2, 3], meta={b"label_names": names, b"num_vis": 3072}), "test")
    assert s.classes == [f"c{i}" for i in range(10)]


def test_cifar_keys_that_are_not_utf8_do_not_crash(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"\xff": 1, b"data": np.zeros((1, 3072), np.uint8)}, protocol=4))
    with pytest.raises(DataError, match="test_batch: missing field 'labels'"):
        read_cifar10(d, "test")


class _Uninitialised:
    """Pickles to numpy's array constructor with a full shape and no data: an array of uninitialised memory."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (4, 3072), b"B"))


def test_pickled_array_without_its_data_is_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match="without its data"):
        safe_load(pickle.dumps(_Uninitialised(), protocol=4), source="x")
    d = tmp_path / "c"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Uninitialised(), b"labels": [0, 1, 2, 3]}, protocol=4))
    with pytest.raises(DataError, match="test_batch"):
        read_cifar10(d, "test")
    assert safe_load(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3), protocol=4)).tolist() == [[0, 1, 2],
                                                                                                        [3, 4, 5]]


# -------------------------------------------------------------------------------------------------- image folders
def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width, height, rows=b"", depth=8, color=0):
    """A PNG file's bytes from raw (already filtered) rows; a header only when ``rows`` is empty."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def _folder(root, n=2):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_a_decompression_bomb_png_is_listed_unreadable_and_the_rest_is_read(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "a" / "bomb.png").write_bytes(_png(20000, 20000))  # 400 M pixels declared, 100 bytes on disk
    with pytest.warns(UserWarning, match="bomb.png"):
        s = read_image_folder(root, size=8)
    assert len(s) == 4 and s.classes == ["a", "b"]
    (rel, why), = s.meta["unreadable"]
    assert rel.endswith("bomb.png") and "DecompressionBomb" in why and "400000000 pixels" in why
    with pytest.warns(UserWarning, match="bomb.png"):
        assert len(load_dataset("folder", path=root, image_size=8)) == 4


def test_images_over_the_pixel_limit_are_listed_unreadable(tmp_path):
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(root / "b" / "large.png")
    with pytest.warns(UserWarning, match="large.png"):
        s = read_image_folder(root, size=8, max_pixels=5000)
    assert len(s) == 4 and "100x100 pixels, more than max_pixels=5000" in s.meta["unreadable"][0][1]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, channels):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    values = np.array([[0, 1000], [32768, 65535]], np.uint16)
    Image.fromarray(values).save(root / "a" / "gray16.png")
    rgb = np.stack([values, 65535 - values, values // 2], -1)
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(2))
    (root / "a" / "rgb16.png").write_bytes(_png(2, 2, rows, depth=16, color=2))
    s = read_image_folder(root, size=2, channels=channels)
    gray = s.images[s.paths.index("a/gray16.png")]
    expected = np.round(values / 257).astype(np.uint8)  # 0, 4, 128, 255
    assert (gray[..., 0] == expected).all() and (gray == gray[..., :1]).all()
    if channels == 3:
        col = s.images[s.paths.index("a/rgb16.png")].astype(int)
        assert np.abs(col[..., 0] - expected).max() <= 1 and np.abs(col[..., 1] - (255 - expected)).max() <= 1


def test_float_images_are_unreadable_not_guessed(tmp_path):
    root = _folder(tmp_path / "imgs")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(root / "a" / "float.tif")
    with pytest.warns(UserWarning, match="float.tif"):
        s = read_image_folder(root, size=8)
    assert len(s) == 4 and "mode F" in s.meta["unreadable"][0][1]


# ------------------------------------------------------------------------------------------------------ locating
def test_missing_dataset_message_names_only_real_options(tmp_path, monkeypatch):
    monkeypatch.delenv("POISONLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert "--download" not in str(e.value) and "download = true" in str(e.value)


def test_archive_member_escaping_to_a_sibling_folder_is_refused(tmp_path):
    import io
    import tarfile

    from poisonlab.data.locate import _safe_extract

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("../cifar-evil/x")  # resolves to a sibling whose name starts like the root's
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "cifar").mkdir()
    with pytest.raises(DataError, match=r"a\.tar: refusing unsafe archive member '\.\./cifar-evil/x'"):
        _safe_extract(archive, tmp_path / "cifar")
    assert not (tmp_path / "cifar-evil").exists()
