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


def test_a_victim_recipe_ablation_reuses_the_crafted_poisons(digits, tmp_path, monkeypatch):
    """--victim-set: the pair's poisons are crafted once (stored under OUT/cache) and a victim with another
    recipe trains on the very same poisoned set; its control is a clean model of the changed recipe."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    crafted, trained = [], []
    real_poison = TA._gm_poisons

    def counting_poisons(*a, **k):
        out = real_poison(*a, **k)
        crafted.append(out[2])
        return out

    real_train = TA._train

    def recording_train(args, train, seed, victim=False, init=None):
        trained.append((TA._recipe(args, victim).label_smoothing, train.images.copy()))
        return real_train(args, train, seed, victim, init)

    monkeypatch.setattr(TA, "_gm_poisons", counting_poisons)
    monkeypatch.setattr(TA, "_train", recording_train)
    out = tmp_path / "gm"
    argv = ["gradient_matching", "--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1",
            "--batch-size", "64", "--pairs", "2", "--first-pair", "1", "--steps", "1", "--restarts", "1",
            "--budget", "0.02", "--controls", "--threads", str(torch.get_num_threads()), "--no-bf16"]
    TA.main(argv)
    TA.main(argv + ["--victim-set", "label_smoothing=0"])
    assert crafted == [False, True]  # crafted for the first victim, reused for the second
    rows = [r for r in TA.Bench(out, "gradient_matching", []).rows if r.get("part") == "gradient_matching"
            and "key" in r]
    assert len(rows) == 2 and rows[1]["key"] == rows[0]["key"] + '/victim:{"label_smoothing": 0}'
    assert rows[0]["key"].split("/")[2] == "1"  # --first-pair 1: pair 0 was not measured
    assert rows[1]["victim_set"] == {"label_smoothing": 0} and rows[1]["poisons_reused"]
    assert rows[1]["target"] == rows[0]["target"] and rows[1]["alignment_last"] == rows[0]["alignment_last"]
    # trained: clean surrogate (0.2), victim (0.2), control seed 2 (0.2), victim (0), control seed 2 (0)
    assert [ls for ls, _ in trained] == [0.2, 0.2, 0.2, 0.0, 0.0]
    assert np.array_equal(trained[1][1], trained[3][1])  # the same poisoned images
    assert not np.array_equal(trained[1][1], trained[0][1])
    assert len(list(out.glob("clean_*_v*_s2.pt"))) == 1


def test_victim_set_names_a_train_config_field_and_a_valid_value(tmp_path, capsys):
    for bad in ("label_smoothing", "no_such_field=1", "label_smoothing=2", "preset=airbench94"):
        with pytest.raises(SystemExit):
            TA.main(["gradient_matching", "--out", str(tmp_path), "--victim-set", bad])
    with pytest.raises(SystemExit):
        TA.main(["nn_flip", "--out", str(tmp_path), "--victim-set", "label_smoothing=0"])
    capsys.readouterr()
    for option, bad in (("--craft-label-smoothing", "1"), ("--craft-label-smoothing", "-0.1"), ("--budget", "2")):
        with pytest.raises(SystemExit):
            TA.main(["gradient_matching", "--out", str(tmp_path), option, bad])
        assert option in capsys.readouterr().err
    assert not (tmp_path / "gradient_matching.json").exists()  # refused before anything ran


def test_label_consistent_part_measures_each_surrogate_and_amplitude_once(digits, tmp_path, monkeypatch):
    """The label_consistent part: one row per surrogate x amplitude, with the surrogate's own seconds and
    the victim's ASR; a rerun with the same OUT measures nothing again."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    out = tmp_path / "lc"
    argv = ["label_consistent", "--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1",
            "--batch-size", "64", "--surrogates", "adversarial_finetune", "clean", "--surrogate-epochs", "1",
            "--amplitudes", "1.0", "0.25", "--threads", str(torch.get_num_threads()), "--no-bf16"]
    TA.main(argv)
    rows = [r for r in TA.Bench(out, "label_consistent", []).rows if "key" in r]
    assert sorted((r["surrogate"], r["amplitude"]) for r in rows) == [
        ("adversarial_finetune", 0.25), ("adversarial_finetune", 1.0), ("clean", 0.25), ("clean", 1.0)]
    n_class0 = int((digits[0].labels == 0).sum())
    for r in rows:
        assert r["n_poisons"] == round(0.5 * n_class0) and 0 <= r["asr"] <= 1 and 0 <= r["clean_acc"] <= 1
        assert (r["surrogate_seconds"] > 0) == (r["surrogate"] != "clean")
    TA.main(argv)
    assert len([r for r in TA.Bench(out, "label_consistent", []).rows if "key" in r]) == 4


def test_the_known_init_diagnostic_trains_the_victim_with_the_surrogates_seed(digits, tmp_path, monkeypatch):
    """--victim-seed surrogate: the victim trains with the surrogate's own seed, its control is the surrogate
    itself (no further clean model is trained) and its key says so; --craft-shift reaches the attack."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    seeds = []
    real_train = TA._train

    def recording_train(args, train, seed, victim=False, init=None):
        seeds.append((seed, victim))
        return real_train(args, train, seed, victim, init)

    monkeypatch.setattr(TA, "_train", recording_train)
    out = tmp_path / "gm"
    TA.main(["gradient_matching", "--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1",
             "--batch-size", "64", "--pairs", "1", "--steps", "1", "--restarts", "1", "--budget", "0.02",
             "--controls", "--victim-seed", "surrogate", "--craft-shift", "1", "--seed", "3",
             "--threads", str(torch.get_num_threads()), "--no-bf16"])
    assert seeds == [(3, False), (3, True)]  # the surrogate, then its victim: no control trained
    rows = TA.Bench(out, "gradient_matching", []).rows
    pair = next(r for r in rows if r.get("part") == "gradient_matching" and "key" in r)
    ctl = next(r for r in rows if r.get("part") == "gradient_matching_control" and "key" in r)
    assert pair["key"].endswith("/shift1/seed:surrogate") and pair["victim_seed"] == 3 and pair["shift"] == 1
    assert ctl["seed"] == 3 and ctl["p_adv_control"] == pytest.approx(pair["p_adv_clean"], abs=1e-4)
    assert list(out.glob("clean_*.pt")) == list(out.glob("clean_*_s3.pt"))


def test_a_bad_craft_shift_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        TA.main(["gradient_matching", "--out", str(tmp_path / "gm"), "--craft-shift", "40"])
    assert "--craft-shift" in capsys.readouterr().err and not (tmp_path / "gm").exists()


def test_the_fine_tuning_diagnostic_starts_victim_and_control_from_the_surrogate(digits, tmp_path, monkeypatch):
    """--victim-init surrogate: the victim and its control both train on from the surrogate's weights (the
    control on the clean set, saved under its own _ft name); the key says so."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    starts = []
    real_train = TA._train

    def recording_train(args, train, seed, victim=False, init=None):
        starts.append(None if init is None else {k: v.clone() for k, v in init.items()})
        return real_train(args, train, seed, victim, init)

    monkeypatch.setattr(TA, "_train", recording_train)
    out = tmp_path / "gm"
    TA.main(["gradient_matching", "--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1",
             "--batch-size", "64", "--pairs", "1", "--steps", "1", "--restarts", "1", "--budget", "0.02",
             "--controls", "--victim-init", "surrogate", "--threads", str(torch.get_num_threads()), "--no-bf16"])
    assert starts[0] is None and starts[1] is not None and starts[2] is not None  # surrogate, victim, control
    surrogate = TA._new_model(TA.argparse.Namespace(model="fastnet", model_params='{"widths": [16, 32, 64]}',
                                                    device="cpu"), digits[0])
    from poisonlab.utils import load_state_dict

    surrogate.load_state_dict(load_state_dict(next(out.glob("clean_*_s0.pt"))))
    for k, v in surrogate.state_dict().items():
        assert torch.equal(starts[1][k], v) and torch.equal(starts[2][k], v)
    rows = TA.Bench(out, "gradient_matching", []).rows
    pair = next(r for r in rows if r.get("part") == "gradient_matching" and "key" in r)
    assert pair["key"].endswith("/init:surrogate") and pair["victim_init"] == "surrogate"
    assert len(list(out.glob("clean_*_ft_s1.pt"))) == 1


def test_gm_alignment_reads_each_stored_pair_once(digits, tmp_path, monkeypatch):
    """gm_alignment: one row per pair stored by gradient_matching with this recipe, its stored poisons'
    alignment next to the crafting's own figure; entries of another recipe are left alone; a rerun adds nothing."""
    monkeypatch.setattr(TA, "_data", lambda args: digits)
    out = tmp_path / "gm"
    common = ["--out", str(out), "--model-params", '{"widths": [16, 32, 64]}', "--epochs", "1", "--batch-size", "64",
              "--threads", str(torch.get_num_threads()), "--no-bf16"]
    TA.main(["gradient_matching", *common, "--pairs", "2", "--steps", "4", "--restarts", "1", "--budget", "0.02"])
    TA.main(["gm_alignment", *common])
    rows = [r for r in TA.Bench(out, "gm_alignment", []).rows if r.get("part") == "gm_alignment"]
    assert len(rows) == 2 and len({r["key"] for r in rows}) == 2
    for r in rows:
        assert abs(r["alignment_stored"] - r["final_alignment_crafting"]) < 0.05, r
        assert -1 <= r["alignment_unperturbed"] <= 1 and r["n_poisons"] > 0
    TA.main(["gm_alignment", *common])  # done: nothing is measured again
    assert sum(r.get("part") == "gm_alignment" for r in TA.Bench(out, "gm_alignment", []).rows) == 2
    other = [*common[:2], "--model-params", '{"widths": [8, 16, 32]}', *common[4:]]  # another recipe: no entry of its own
    TA.main(["gm_alignment", *other])
    assert any(r.get("event") == "warning" and "no stored" in r["note"] for r in TA.Bench(out, "gm_alignment", []).rows)
