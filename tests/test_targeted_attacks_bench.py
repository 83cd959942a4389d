"""benchmarks/targeted_attacks.py's plumbing: the transfer victim's linear head and a clean model given as a file."""

import argparse

import numpy as np
import pytest
import torch

from poisonlab.models import build_model
from poisonlab.utils import save_state_dict

from helpers import load_benchmark

TA = load_benchmark("targeted_attacks")


def test_the_linear_head_answers_in_the_order_of_the_classes_given():
    """Classes given out of order (the pair head passes (target class, adversarial class)) keep that order."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (100, 4)), rng.normal(2, 1, (100, 4))])
    y = np.repeat([7, 2], 100)
    head = TA._linear_head(x, y, (7, 2))
    p = head(np.array([[-3.0] * 4, [3.0] * 4]))
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1)
    assert p[0, 0] > 0.99 and p[1, 1] > 0.99  # column 0 is class 7, column 1 class 2


def _args(tmp_path, clean_model):
    return argparse.Namespace(model="fastnet", model_params=None, clean_model=str(clean_model), device="cpu")


def test_a_given_clean_model_is_loaded_and_its_accuracy_logged(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    model = build_model("fastnet", 1, 10, 8, *train.channel_stats())
    path = tmp_path / "clean.pt"
    save_state_dict(model, path)
    bench = TA.Bench(tmp_path / "out", "feature_collision", [])
    got = TA._given_clean(_args(tmp_path, path), bench, train, test)
    for a, b in zip(got.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    row = bench.rows[-1]
    assert row["event"] == "clean_model" and row["from"] == str(path) and 0 <= row["clean_acc"] <= 1


def test_a_clean_model_file_that_does_not_fit_is_refused_in_one_sentence(digits, tmp_path):
    train, test = digits
    bench = TA.Bench(tmp_path / "out", "feature_collision", [])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    save_state_dict(build_model("cnn3", 1, 10, 8), other)
    for path in (junk, other, tmp_path / "missing.pt"):
        with pytest.raises(SystemExit, match=rf"--clean-model: {path}"):
            TA._given_clean(_args(tmp_path, path), bench, train, test)


def test_gradient_matching_controls_pair_each_victim_with_a_clean_model_of_its_seed(digits, tmp_path, monkeypatch):
    """--controls: one control row per pair, from a clean model trained with the victim's seed and saved
    under OUT; its lift is the victim's probability minus the control's; a rerun trains nothing again."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    out = tmp_path / "gm"
    argv = ["gradient_matching", "--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1",
            "--batch-size", "64", "--pairs", "2", "--steps", "1", "--restarts", "1", "--budget", "0.02",
            "--controls", "--threads", str(torch.get_num_threads()), "--no-bf16"]
    TA.main(argv)
    rows = TA.Bench(out, "gradient_matching", []).rows
    pairs = [r for r in rows if r.get("part") == "gradient_matching" and "key" in r]
    controls = [r for r in rows if r.get("part") == "gradient_matching_control" and "key" in r]
    assert len(pairs) == 2 and len(controls) == 2
    for pair, ctl in zip(pairs, controls):
        assert ctl["key"] == pair["key"] + "/control" and ctl["target"] == pair["target"]
        assert ctl["p_adv_lift"] == pytest.approx(pair["p_adv_victim"] - ctl["p_adv_control"], abs=2e-4)
    assert [c["seed"] for c in controls] == [1, 2]  # the victims' seeds, not the surrogate's 0
    assert len(list(out.glob("clean_*_s[012].pt"))) == 3
    n_clean = sum(r.get("event") == "clean_model" for r in rows)
    TA.main(argv)  # everything is done: nothing is trained or crafted again
    again = TA.Bench(out, "gradient_matching", []).rows
    assert sum(r.get("event") == "clean_model" for r in again) == n_clean
    assert sum(r.get("part") == "gradient_matching" and "key" in r for r in again) == 2


def test_controls_cannot_be_asked_of_a_given_clean_model(tmp_path):
    with pytest.raises(SystemExit):
        TA.main(["gradient_matching", "--out", str(tmp_path), "--clean-model", str(tmp_path / "m.pt"), "--controls"])
