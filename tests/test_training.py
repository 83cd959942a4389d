import numpy as np
import pytest
import torch

from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit, predict_proba
from poisonlab.training.augment import augment_batch, random_crop
from poisonlab.utils import load_state_dict, save_state_dict
from poisonlab.errors import DataError


def _train(digits, seed, **kw):
    tr, te = digits
    torch.manual_seed(seed)
    m = build_model("fastnet", 1, 10, 8)
    h = fit(m, tr, TrainConfig(epochs=kw.pop("epochs", 4), batch_size=64, **kw), seed=seed)
    return m, h


def test_fit_learns_and_repeats(digits):
    tr, te = digits
    m1, h1 = _train(digits, 0)
    m2, h2 = _train(digits, 0)
    acc = (predict_proba(m1, te).argmax(1) == te.labels).mean()
    assert acc > 0.85
    assert h1[-1]["loss"] == pytest.approx(h2[-1]["loss"], rel=1e-5)
    assert h1[-1]["loss"] < h1[0]["loss"]


def test_progress_off_a_terminal_is_one_line_per_epoch(digits, capsys):
    """Off a terminal (a background run's log file) the progress is a line per epoch on stderr: a live bar
    would draw nothing there."""
    tr, _ = digits
    fit(build_model("fastnet", 1, 10, 8), tr, TrainConfig(epochs=3, batch_size=64), progress=True,
        description="victim")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" loss ")[0] for line in err] == [f"victim: epoch {i}/3" for i in (1, 2, 3)]
    assert all(" acc " in line and line.endswith("s)") for line in err)


def test_progress_of_steps_off_a_terminal_is_about_ten_lines(capsys):
    """A defence's 2,000 mask steps print about ten lines in a log file, the last at the end."""
    from poisonlab.training.progress import progress_counter

    bar = progress_counter(True, "anp masks", 25, unit="step")
    for _ in range(25):
        bar.advance()
    bar.stop()
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [f"anp masks: step {i}/25" for i in (*range(3, 25, 3), 25)]
    quiet = progress_counter(False, "x", 5)
    quiet.advance()
    quiet.stop()
    assert capsys.readouterr().err == ""
    resumed = progress_counter(True, "anp masks", 20, unit="step", done=14)  # a run continued from step 14
    for _ in range(6):
        resumed.advance()
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "anp masks: step 16/20", "anp masks: step 18/20", "anp masks: step 20/20"]


def test_validation_plateau_and_early_stopping(digits):
    _, h = _train(digits, 0, epochs=30, val_fraction=0.2, schedule="plateau", early_stopping_patience=2,
                  early_stopping_metric="val_acc", optimizer="adam", lr=1e-3)
    assert "val_acc" in h[0]
    assert len(h) < 30 and h[-1].get("stopped_early")


def test_config_validation_names_field():
    with pytest.raises(Exception, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(Exception, match="val_fraction"):
        TrainConfig(schedule="plateau")
    with pytest.raises(Exception, match="extra"):
        TrainConfig(epochz=3)


def test_sample_weights_zero_drops_samples(digits):
    tr, te = digits
    bad = tr.labels == 3
    poisoned = tr.with_data(labels=np.where(bad, 7, tr.labels))  # every 3 relabelled 7
    rates = []
    for w in (None, (~bad).astype(np.float32)):
        torch.manual_seed(0)
        m = build_model("fastnet", 1, 10, 8)
        fit(m, poisoned, TrainConfig(epochs=4, batch_size=64), sample_weight=w)
        pred = predict_proba(m, te).argmax(1)
        rates.append((pred[te.labels == 3] == 7).mean())
    assert rates[0] > 0.8  # learnt the flipped labels
    assert rates[1] < 0.5  # weight 0 = those samples never taught anything


def test_augmentations_batched():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    y = augment_batch(x, crop_padding=4, flip=True, brightness=0.2, contrast=0.2, gen=g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # a crop is a shifted copy: the centre region of some image appears shifted
    z = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert z.shape == x.shape
    assert any(torch.equal(z[0, :, 2:30, 2:30], x[0, :, 2 + dy:30 + dy, 2 + dx:30 + dx])
               for dy in range(-2, 3) for dx in range(-2, 3))


def test_checkpoint_round_trip_and_refuses_code(tmp_path, digits):
    m, _ = _train(digits, 0, epochs=1)
    save_state_dict(m, tmp_path / "m.pt")
    m2 = build_model("fastnet", 1, 10, 8)
    m2.load_state_dict(load_state_dict(tmp_path / "m.pt"))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(m.eval()(x), m2.eval()(x))

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="not a safe poisonlab checkpoint"):
        load_state_dict(tmp_path / "evil.pt")


def test_step_schedule_and_its_validation():
    from pydantic import ValidationError

    from poisonlab.experiments.plan import training_key_dump
    from poisonlab.training.loop import lr_factor

    cfg = TrainConfig(schedule="step", warmup_fraction=0.0)  # milestones at half and three quarters
    assert [lr_factor(cfg, s, 100) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    for bad in ((0.75, 0.5), (0.5, 1.0), (0.0,)):
        with pytest.raises(ValidationError, match="step_milestones must be increasing shares"):
            TrainConfig(schedule="step", step_milestones=bad)
    # recipes written before the step schedule keep their cache keys: its fields stay out while at defaults
    assert "step_milestones" not in training_key_dump(TrainConfig())
    assert training_key_dump(TrainConfig(step_factor=0.5))["step_factor"] == 0.5
