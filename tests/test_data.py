import gzip
import http.server
import os
import pickle
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from poisonlab.data import load_dataset, read_cifar10, read_idx, read_image_folder, read_mnist_like
from poisonlab.data.locate import download_file, fetch_dataset, md5sum, SOURCES, RemoteFile, DatasetSource
from poisonlab.data.safe_pickle import safe_load
from poisonlab.errors import DataError, UnsafePickleError


def test_cifar10_real_files(data_root, cifar_test):
    assert cifar_test.images.shape == (10000, 32, 32, 3)
    assert cifar_test.images.dtype == np.uint8
    assert cifar_test.classes[0] == "airplane" and cifar_test.classes[9] == "truck"
    assert (cifar_test.class_counts() == 1000).all()
    means = cifar_test.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(means, [0.4942, 0.4851, 0.4504], atol=0.01)


def test_cifar10_train_stats(data_root):
    tr = read_cifar10(data_root / "cifar-10-batches-py", "train")
    assert len(tr) == 50000 and (tr.class_counts() == 5000).all()
    # exact per-channel moments from each channel's 256-bin histogram (a float64 copy of 150M values takes 12 s)
    v = np.arange(256) / 255
    hist = np.stack([np.bincount(tr.images[..., c].ravel(), minlength=256) for c in range(3)]) / (50000 * 32 * 32)
    mean = hist @ v
    std = np.sqrt(hist @ v**2 - mean**2)
    assert np.allclose(mean, [0.4914, 0.4822, 0.4465], atol=2e-3)
    assert np.allclose(std, [0.2470, 0.2435, 0.2616], atol=2e-3)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/poisonlab_pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = Path("/tmp/poisonlab_pwned")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    payload = pickle.dumps({b"data": _Evil(), b"labels": [0]})
    (bad / "test_batch").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="refused to unpickle global"):
        read_cifar10(bad, "test")
    assert not marker.exists()


def test_restricted_unpickler_refuses_object_arrays():
    arr = np.array([1, "a"], dtype=object)
    with pytest.raises(UnsafePickleError):
        safe_load(pickle.dumps(arr, protocol=2))
    ok = safe_load(pickle.dumps({b"x": np.arange(5, dtype=np.uint8)}, protocol=4))
    assert ok[b"x"].tolist() == [0, 1, 2, 3, 4]
    ok5 = safe_load(pickle.dumps(np.arange(3, dtype=np.int32), protocol=5))
    assert ok5.tolist() == [0, 1, 2]


def test_cifar_corrupt_and_wrong_fields(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="test_batch"):
        read_cifar10(d, "test")
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="'data' must be uint8 of shape"):
        read_cifar10(d, "test")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_real(data_root, name):
    folder = data_root / ("mnist" if name == "mnist" else "fashion-mnist")
    te = read_mnist_like(folder, "test", name)
    assert te.images.shape == (10000, 28, 28, 1)
    assert te.num_classes == 10
    if name == "mnist":
        tr = load_dataset("mnist", "train", data_dir=data_root)
        x = tr.images.astype(np.float64) / 255
        assert abs(x.mean() - 0.1307) < 1e-3 and abs(x.std() - 0.3081) < 1e-3
    else:
        assert te.classes[9] == "Ankle boot"


def _write_idx(path, arr, code=0x08, gz=True):
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_errors(tmp_path):
    good = np.zeros((3, 4, 4), np.uint8)
    _write_idx(tmp_path / "a.gz", good)
    assert read_idx(tmp_path / "a.gz").shape == (3, 4, 4)
    _write_idx(tmp_path / "plain", good, gz=False)
    assert read_idx(tmp_path / "plain").shape == (3, 4, 4)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x03" + b"\0" * 20)
    with pytest.raises(DataError, match="bad idx magic"):
        read_idx(tmp_path / "bad")
    raw = gzip.open(tmp_path / "a.gz").read()
    gzip.open(tmp_path / "trunc.gz", "wb").write(raw[:-5])
    with pytest.raises(DataError, match="idx header says shape"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "notgz.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "notgz.gz")


def test_digits_embedded():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and tr.shape == (8, 8, 1)
    assert tr.images.max() == 255
    sub = tr.stratified_subset(200, seed=1)
    assert len(sub) == 200 and sub.class_counts().min() >= 15


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"this is no jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        s = read_image_folder(tmp_path, size=16)
    assert s.images.shape == (6, 16, 16, 3) and s.classes == ["cat", "dog"]
    assert s.paths[0] == os.path.join("cat", "0.png")
    assert s.meta["unreadable"][0][0] == os.path.join("dog", "broken.jpg")
    with pytest.raises(DataError, match="one sub-folder per class"):
        read_image_folder(tmp_path / "cat")


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.delenv("POISONLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="not found .*--data-dir"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_env_var_locates_data(data_root, monkeypatch):
    monkeypatch.setenv("POISONLAB_DATA", str(data_root))
    assert len(load_dataset("fashion_mnist", "test")) == 10000


@pytest.fixture()
def local_server(data_root):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(data_root / "mnist"))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_checksum_and_fetch(local_server, data_root, tmp_path, monkeypatch):
    src_file = data_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    good = md5sum(src_file)
    dest = download_file(f"{local_server}/t10k-labels-idx1-ubyte.gz", tmp_path / "x.gz", good, progress=False)
    assert md5sum(dest) == good
    with pytest.raises(DataError, match="checksum mismatch"):
        download_file(f"{local_server}/t10k-labels-idx1-ubyte.gz", tmp_path / "y.gz", "0" * 32, progress=False)
    assert not (tmp_path / "y.gz").exists() and not (tmp_path / "y.gz.part").exists()
    with pytest.raises(DataError, match="could not download"):
        download_file(f"{local_server}/nope.gz", tmp_path / "z.gz", None, progress=False)
    # the whole dataset through fetch_dataset, with this copy's checksums
    orig = SOURCES["mnist"]
    files = tuple(RemoteFile(f.url, md5sum(data_root / "mnist" / f.filename), f.filename) for f in orig.files)
    monkeypatch.setitem(SOURCES, "mnist", DatasetSource(orig.folder, files, orig.required))
    folder = fetch_dataset("mnist", tmp_path / "root", base_url=local_server, progress=False)
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "root")
    assert folder.name == "mnist" and len(ds) == 10000
