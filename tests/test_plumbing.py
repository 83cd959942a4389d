"""Shared plumbing: validators, k-fold out-of-sample probabilities, the robust z-score, the results table."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from poisonlab.data import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.metrics import robust_z
from poisonlab.report.tables import table_csv, write_table
from poisonlab.training import cross_val_pred_probs
from poisonlab.validate import check_choice, check_int, check_range, check_rate


def test_validators_name_the_parameter_and_range():
    assert check_rate(np.float32(0.5)) == 0.5 and check_int(np.int64(3), "k", 1, 5) == 3
    for call, msg in [(lambda: check_rate(True), r"rate must be in \(0, 1\], got True"),
                      (lambda: check_rate(0), r"rate must be in \(0, 1\], got 0"),
                      (lambda: check_int(2.0, "k", 1, 5), r"k must be an integer in \[1, 5\], got 2.0"),
                      (lambda: check_range(1, "eps", 0, 1, hi_open=True), r"eps must be in \[0, 1\), got 1"),
                      (lambda: check_choice("x", "mode", ("a", "b")), "mode must be one of 'a', 'b', got 'x'")]:
        with pytest.raises(ParameterError, match=msg):
            call()


class _Memoriser(nn.Module):
    """Knows the labels of the images it was trained on (one-hot logits); knows nothing else (zeros)."""

    def __init__(self, train: ImageSet, k: int):
        super().__init__()
        self.k = k
        self.table = {img.tobytes(): int(y) for img, y in zip(train.images, train.labels)}
        self.dummy = nn.Parameter(torch.zeros(1))  # predict_proba reads the device from a parameter

    def forward(self, x):
        keys = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out = torch.zeros(len(x), self.k)
        for i, key in enumerate(keys):
            y = self.table.get(key.tobytes())
            if y is not None:
                out[i, y] = 50.0
        return out


def test_cross_val_pred_probs_predicts_every_image_with_a_model_that_never_saw_it():
    rng = np.random.default_rng(0)
    data = ImageSet(rng.integers(0, 256, (60, 4, 4, 1), dtype=np.uint8), np.repeat(np.arange(3), 20),
                    ["a", "b", "c"])
    seen = []
    probs = cross_val_pred_probs(lambda s: _Memoriser(s, 3), data, folds=4, seed=0,
                                 on_fold=lambda i, m, te, p: seen.append((i, te)))
    assert probs.shape == (60, 3) and np.allclose(probs, 1 / 3)  # in-sample it would be one-hot
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert sorted(np.concatenate([te for _, te in seen]).tolist()) == list(range(60))


def test_robust_z_ignores_a_minority_of_outliers():
    x = np.r_[np.random.default_rng(0).normal(0, 1, 200), [50.0, 60.0]]
    z = robust_z(x)
    assert z[-2:].min() > 30 and abs(np.median(z)) < 1e-9
    flat = np.r_[np.zeros(10), [1.0]]
    assert robust_z(flat)[-1] == pytest.approx(1 / flat.std())  # MAD 0: falls back to the std
    assert robust_z(flat, min_mad=0.5)[-1] == pytest.approx(2.0)  # or to the floor given


def test_one_table_writer_for_grids_and_federated(tmp_path):
    rows = [{"run": "a", "clean_acc": 0.5, "asr": float("nan"), "excluded": [1, 2], "audit": {"x": 1}, "extra": None},
            {"run": "b", "clean_acc": 1 / 3, "new": "n"}]
    text = table_csv(rows, ["run", "clean_acc", "asr"])
    table = list(csv.DictReader(io.StringIO(text)))
    assert list(table[0]) == ["run", "clean_acc", "asr", "excluded", "extra", "new"]  # dicts stay in the JSON
    assert table[0]["asr"] == "" and table[0]["excluded"] == "1 2" and table[1]["clean_acc"] == "0.333333"
    write_table(tmp_path, "rounds", rows, ["run"])
    assert json.loads((tmp_path / "rounds.json").read_text())[0]["audit"] == {"x": 1}
    assert (tmp_path / "rounds.csv").read_bytes().decode() == table_csv(rows, ["run"])
