"""Your own model, data and methods: import paths in configs, entry points, plain nn.Modules, array layouts."""

import importlib
import textwrap

import numpy as np
import pytest
import torch

from poisonlab.attacks import ATTACKS
from poisonlab.data import ImageSet, load_data
from poisonlab.errors import ConfigError, DataError

PACKAGE = {
    "__init__.py": "",
    "nets.py": '''
        import torch
        from torch import nn


        class SmallNet(nn.Module):
            """A plain nn.Module: no features() method, shape arguments it does not want are not passed."""

            def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 32):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
                self.fc1 = nn.Linear(16 * 16, hidden)
                self.fc2 = nn.Linear(hidden, num_classes)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(self.conv(x).flatten(1))))
    ''',
    "attacks.py": '''
        import numpy as np

        from poisonlab.attacks import Attack, n_poison
        from poisonlab.validate import check_range, check_rate


        class FlipToTarget(Attack):
            """Relabel a random share of the non-target images as the target class (a toy dirty-label attack)."""

            family = "label"

            def __init__(self, rate: float = 0.1, target: int = 0):
                self.rate = check_rate(rate)
                self.target = int(check_range(target, "target", 0, 10_000))

            def _poison(self, train, rng, context):
                pool = np.nonzero(train.labels != self.target)[0]
                idx = np.sort(rng.choice(pool, n_poison(self.rate, len(pool), "flip_to_target"), replace=False))
                labels = train.labels.copy()
                labels[idx] = self.target
                return train.with_data(labels=labels), self._record(idx, train.labels[idx])
    ''',
    "data.py": '''
        import numpy as np
        from sklearn.datasets import load_digits


        def load(split):
            """Digits as float NCHW arrays in [0, 1]: (images, labels, classes)."""
            d = load_digits()
            x = (d.images / 16.0)[:, None].astype(np.float32)  # (N, 1, 8, 8)
            part = slice(0, 1400) if split == "train" else slice(1400, None)
            return x[part], d.target[part], [str(c) for c in range(10)]
    ''',
}
ENTRY_POINTS = """
[poisonlab.attacks]
flip_to_target = extlab.attacks:FlipToTarget

[poisonlab.datasets]
ext_digits = extlab.data:load
"""


@pytest.fixture
def extlab(tmp_path, monkeypatch):
    """An installed third-party package ``extlab`` with entry points (a dist-info folder on sys.path)."""
    site = tmp_path / "site"
    (site / "extlab").mkdir(parents=True)
    for name, text in PACKAGE.items():
        (site / "extlab" / name).write_text(textwrap.dedent(text))
    info = site / "extlab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extlab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # plug-ins loaded by this test leave the registries as they were
    monkeypatch.setattr(ATTACKS, "_items", dict(ATTACKS._items))
    yield site
    for m in [m for m in list(importlib.sys.modules) if m == "extlab" or m.startswith("extlab.")]:
        importlib.sys.modules.pop(m)


def test_external_model_by_import_path_and_attack_by_entry_point_run_a_grid(extlab, tmp_path):
    from poisonlab.experiments import parse_config
    from poisonlab.experiments.runner import run_experiment

    cfg = parse_config({
        "name": "plugins", "seeds": [0],
        "dataset": {"name": "ext_digits", "train_size": 300, "test_size": 100},  # a dataset from an entry point
        "model": {"name": "extlab.nets:SmallNet", "params": {"hidden": 24}, "feature_layer": "fc1"},
        "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "attacks": [{"name": "flip_to_target", "rate": 0.2, "target": 3}],  # an attack from an entry point
        "defenses": [{"name": "spectral_signatures"}],  # reads the penultimate features: fc1, by a hook
        "plots": False})
    rows = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert [r["attack"] for r in rows] == ["none", "flip_to_target(rate=0.2,target=3)",
                                           "flip_to_target(rate=0.2,target=3)"]
    assert not any(r.get("error") for r in rows), [r.get("error") for r in rows]
    assert all(0 <= r["clean_acc"] <= 1 for r in rows)
    flt = rows[2]
    train = load_data("ext_digits", train_size=300).train
    assert flt["defense"] == "spectral_signatures" and 0 <= flt["det_recall"] <= 1
    assert flt["n_poisoned"] == round(0.2 * (train.labels != 3).sum())  # the plug-in's own poisoning
    assert "flip_to_target" in ATTACKS.names()


def test_plain_module_without_features_fails_feature_defences_with_both_ways_named(extlab, tmp_path):
    from poisonlab.experiments import parse_config
    from poisonlab.experiments.runner import run_experiment

    cfg = parse_config({
        "seeds": [0], "dataset": {"name": "mine", "loader": "extlab.data:load", "train_size": 200, "test_size": 100},
        "model": {"name": "extlab.nets:SmallNet"}, "training": {"epochs": 1, "batch_size": 32},
        "attacks": [{"name": "random_flip", "rate": 0.1}], "defenses": [{"name": "spectral_signatures"}],
        "baseline": False, "plots": False})
    rows = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert rows[0]["dataset"] == "mine" and not rows[0].get("error")  # trains and evaluates as it is
    err = rows[1]["error"]
    assert "SmallNet has no features(x) method" in err and 'feature_layer = "<layer>"' in err and "fc1" in err


def test_config_errors_name_the_import_path(extlab):
    from poisonlab.experiments import parse_config

    with pytest.raises(ConfigError, match="model.*'extlab.nets:Nope'.*has no attribute 'Nope'"):
        parse_config({"model": {"name": "extlab.nets:Nope"}})
    with pytest.raises(ConfigError, match="cannot import module 'nowhere'"):
        parse_config({"attacks": [{"name": "nowhere:Attack"}]})
    with pytest.raises(ConfigError, match="unknown attack 'flip_to_nothing'"):
        parse_config({"attacks": [{"name": "flip_to_nothing"}]})


def test_build_model_for_passes_only_accepted_shape_arguments_and_hooks_a_layer(extlab):
    from poisonlab.models import build_model_for
    from poisonlab.models.adapters import HookedFeatures

    train = load_data("ext_digits", train_size=50).train
    m = build_model_for("extlab.nets:SmallNet", train, feature_layer="fc1", hidden=12)
    assert isinstance(m, HookedFeatures) and m.net.fc2.out_features == 10 and m.net.conv[0].in_channels == 1
    x = train.float_tensor()[:5]
    assert m.features(x).shape == (5, 12) and torch.equal(m(x), m.net(x))
    assert m.last_conv is m.net.conv[0]
    with pytest.raises(ConfigError, match="feature_layer 'fc9' is not a layer of SmallNet; its layers: conv"):
        build_model_for("extlab.nets:SmallNet", train, feature_layer="fc9")
    # a poisonlab model keeps its own features()
    own = build_model_for("fastnet", train, widths=(8, 16, 32))
    assert not isinstance(own, HookedFeatures) and own.features(x).shape[0] == 5


# ------------------------------------------------------------------ arrays and datasets
def test_from_arrays_detects_layout_and_converts_numpy_and_torch():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    want = ImageSet.from_arrays(nhwc, np.arange(6) % 3).images
    assert np.array_equal(want, nhwc)
    nchw_float = torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255  # torch, NCHW, float in [0, 1]
    assert np.array_equal(ImageSet.from_arrays(nchw_float, torch.arange(6) % 3).images, want)
    assert np.array_equal(ImageSet.from_arrays(torch.from_numpy(nhwc), np.arange(6) % 3).images, want)  # torch uint8
    grey = ImageSet.from_arrays(nhwc[..., 0], [0, 1, 2, 0, 1, 2], classes=["a", "b", "c"])
    assert grey.images.shape == (6, 9, 9, 1) and grey.classes == ["a", "b", "c"]


def test_from_arrays_refuses_what_it_cannot_read_with_the_way_out():
    ambiguous = np.zeros((2, 3, 4, 3), np.uint8)
    with pytest.raises(DataError, match="cannot tell the layout .* layout='NHWC' or layout='NCHW'"):
        ImageSet.from_arrays(ambiguous, [0, 1])
    assert ImageSet.from_arrays(ambiguous, [0, 1], layout="NCHW").images.shape == (2, 4, 3, 3)
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\], found values in \[0, 255\].*divide by 255"):
        ImageSet.from_arrays(np.linspace(0, 255, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3), [0, 1])
    with pytest.raises(DataError, match="must be uint8 .* or float in \\[0, 1\\], got int64"):
        ImageSet.from_arrays(np.zeros((2, 8, 8, 3), np.int64), [0, 1])
    with pytest.raises(DataError, match="labels must be integers .* got float"):
        ImageSet.from_arrays(np.zeros((2, 8, 8, 3), np.uint8), np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="ImageSet.from_arrays converts torch tensors"):
        ImageSet(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), np.array([0, 1]), ["a", "b"])


def test_from_dataset_converts_a_torch_dataset_in_one_call():
    from torch.utils.data import TensorDataset

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((5, 3, 8, 8), dtype=np.float32))  # what torchvision's ToTensor gives
    ds = TensorDataset(x, torch.tensor([0, 1, 0, 1, 1]))
    s = ImageSet.from_dataset(ds)
    assert s.images.shape == (5, 8, 8, 3) and s.labels.tolist() == [0, 1, 0, 1, 1]
    assert np.array_equal(s.images, np.rint(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8))
    mixed = [(np.zeros((8, 8, 3), np.uint8), 0), (np.zeros((9, 8, 3), np.uint8), 1)]
    with pytest.raises(DataError, match="item 1 has an image of shape \\(9, 8, 3\\)"):
        ImageSet.from_dataset(mixed)


def test_load_data_with_a_loader_import_path(extlab):
    splits = load_data("mine", loader="extlab.data:load", train_size=100)
    assert len(splits.train) == 100 and splits.train.shape == (8, 8, 1) and len(splits.test) == 397
    with pytest.raises(ConfigError, match="dataset loader 'extlab.data:nope'"):
        load_data("mine", loader="extlab.data:nope")
