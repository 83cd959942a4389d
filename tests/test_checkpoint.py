"""Progress files (poisonlab.training.checkpoint): a stopped training continues to the model an
uninterrupted one gives, and a progress file from elsewhere is never trusted blindly."""

import numpy as np
import pytest
import torch

from poisonlab.errors import ConfigError
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit

# airbench's moving parts (Muon, one-cycle, alternating flip, a whitened stem whose bias schedule ends
# mid-run, label smoothing): each carries state across epochs that a resume must restore
RECIPE = dict(epochs=4, batch_size=128, optimizer="muon", lr=0.1, momentum=0.85, schedule="onecycle",
              warmup_fraction=0.0, stem_bias_epochs=1, crop_padding=1, flip=True, flip_mode="alternating",
              label_smoothing=0.2, bf16=False)


class Stop(Exception):
    pass


def _model(**kw):
    torch.manual_seed(0)
    return build_model("fastnet", 1, 10, 8, **kw)


def _fit(train, path=None, stop_after=None, model=None, **overrides):
    model = model if model is not None else _model()

    def callback(rec, _):
        if stop_after is not None and rec["epoch"] == stop_after:
            raise Stop  # as a Ctrl-C or a killed process would, right after an epoch's progress was saved

    hist = fit(model, train, TrainConfig(**(RECIPE | overrides)), seed=3, checkpoint=path, epoch_callback=callback)
    return model, hist


def _same(a, b):
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def _no_seconds(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


@pytest.fixture(scope="module")
def train(digits):
    return digits[0].subset(np.arange(512))  # four batches an epoch: small, and still several steps per epoch


@pytest.fixture(scope="module")
def straight(train):
    return _fit(train)


def test_a_stopped_training_continues_to_the_same_model(train, straight, tmp_path):
    path = tmp_path / "fit.pt"
    with pytest.raises(Stop):
        _fit(train, path, stop_after=2)
    assert path.is_file()
    model, hist = _fit(train, path)
    _same(model, straight[0])
    assert _no_seconds(hist) == _no_seconds(straight[1])
    epochs_run = []
    model2 = _model()
    fit(model2, train, TrainConfig(**RECIPE), seed=3, checkpoint=path,
        epoch_callback=lambda rec, _: epochs_run.append(rec["epoch"]))
    assert epochs_run == []  # finished: nothing left to train, the saved model is given back
    _same(model2, straight[0])


def test_an_early_stopped_run_stays_stopped(train, tmp_path):
    path = tmp_path / "fit.pt"
    kw = dict(epochs=30, val_fraction=0.2, early_stopping_patience=1, early_stopping_metric="val_loss",
              optimizer="adam", lr=0.05, schedule="none", stem_bias_epochs=None)
    m1, h1 = _fit(train, path, **kw)
    assert h1[-1].get("stopped_early") and len(h1) < 30
    m2, h2 = _fit(train, path, **kw)
    assert _no_seconds(h2) == _no_seconds(h1)
    _same(m1, m2)


def test_an_unreadable_progress_file_is_reported_and_training_starts_over(train, straight, tmp_path):
    path = tmp_path / "fit.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.warns(UserWarning, match=r"fit\.pt: progress file unreadable .*starting this work over"):
        model, _ = _fit(train, path)
    _same(model, straight[0])


def test_a_progress_file_of_other_settings_is_refused(train, tmp_path):
    path = tmp_path / "fit.pt"
    with pytest.raises(Stop):
        _fit(train, path, stop_after=1)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"fit\.pt: progress file of a different run"):
        _fit(train, path, lr=0.2)
    with pytest.raises(ConfigError, match="different run"):  # other data
        _fit(train.subset(np.arange(500)), path)
    assert path.read_bytes() == before  # nothing already written is lost


def test_a_progress_file_that_does_not_fit_is_reported_and_ignored(train, straight, tmp_path):
    """Contents that pass the fingerprint but not the checks (a forged or corrupted state) are never loaded."""
    path = tmp_path / "fit.pt"
    with pytest.raises(Stop):
        _fit(train, path, stop_after=2)
    state = torch.load(path, weights_only=True)
    name = next(iter(state["model"]))
    for forged in ({"model": {**state["model"], name: torch.zeros(3, 3)}}, {"epoch": 99}, {"generator": torch.zeros(5)},
                   {"optimizers": state["optimizers"][:1]}, {"history": [{"epoch": 1}]}):
        torch.save({**state, **forged}, path)
        with pytest.warns(UserWarning, match=r"fit\.pt: progress file does not fit this run"):
            model, _ = _fit(train, path)
        _same(model, straight[0])


def test_a_plateau_schedule_resumes_and_a_forged_one_is_never_loaded(train, tmp_path):
    """The plateau schedule's counters travel in the file; its settings (and any extra attribute: a scheduler
    loads a state by updating its ``__dict__``) may not be changed by one."""
    kw = dict(epochs=4, val_fraction=0.2, schedule="plateau", plateau_patience=0, optimizer="adam", lr=0.05,
              stem_bias_epochs=None)
    m0, h0 = _fit(train, **kw)
    path = tmp_path / "fit.pt"
    with pytest.raises(Stop):
        _fit(train, path, stop_after=2, **kw)
    state = torch.load(path, weights_only=True)
    m1, h1 = _fit(train, path, **kw)
    _same(m1, m0)
    assert _no_seconds(h1) == _no_seconds(h0)
    for forged in ({**state["plateau"], "mode": "min"}, {**state["plateau"], "optimizer": "x"},
                   {**state["plateau"], "num_bad_epochs": "7"}):
        torch.save({**state, "plateau": forged}, path)
        with pytest.warns(UserWarning, match=r"fit\.pt: progress file does not fit this run \(plateau: "):
            m2, h2 = _fit(train, path, **kw)
        _same(m2, m0)


def test_a_symbolic_link_is_not_followed(train, straight, tmp_path):
    outside = tmp_path / "outside.pt"
    with pytest.raises(Stop):
        _fit(train, outside, stop_after=2)
    before = outside.read_bytes()
    link = tmp_path / "run" / "fit.pt"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.warns(UserWarning, match="not a plain file"):
        model, _ = _fit(train, link)
    _same(model, straight[0])  # trained from scratch, not from the linked file
    assert outside.read_bytes() == before and not link.is_symlink()


def test_a_stopped_abl_continues_to_the_same_model(digits, tmp_path, monkeypatch):
    """ABL (3 hours at BackdoorBench's budget on CIFAR-10) stopped in its isolation, then in its
    fine-tuning, ends where an uninterrupted run ends."""
    import poisonlab.defenses.abl as abl_module
    from poisonlab.defenses import DefenseContext, get_defense

    train = digits[0].subset(np.arange(640))
    abl = get_defense("abl", isolation_ratio=0.05, isolation_epochs=3, finetune_epochs=3, unlearning_epochs=2,
                      batch_size=64, lr=0.05)

    def run(folder):
        ctx = DefenseContext(train=train, model=_model(), test=digits[1], train_model=None, seed=1,
                             progress_dir=folder)
        return abl.run(ctx)

    straight = run(None)
    calls = {"ascent": 0, "stop_at": 15}  # 10 batches an epoch: the 15th is half-way through the second
    epochs: list[int] = []
    real_loss, real_fit = abl_module.ascent_loss, abl_module.fit

    def counting_loss(*a, **k):
        calls["ascent"] += 1
        if calls["ascent"] == calls["stop_at"]:
            raise Stop
        return real_loss(*a, **k)

    def counting_fit(*a, **k):
        def callback(rec, _):
            epochs.append(rec["epoch"])
            if rec["epoch"] == 2 and len(epochs) == 2:
                raise Stop

        return real_fit(*a, **k, epoch_callback=callback)

    monkeypatch.setattr(abl_module, "ascent_loss", counting_loss)
    monkeypatch.setattr(abl_module, "fit", counting_fit)
    with pytest.raises(Stop):  # stopped in the isolation's second epoch
        run(tmp_path)
    assert torch.load(tmp_path / "abl_isolation.pt", weights_only=True)["epoch"] == 1
    calls.update(ascent=0, stop_at=None)
    with pytest.raises(Stop):  # continues with isolation epochs 2 and 3, stopped after fine-tuning epoch 2
        run(tmp_path)
    assert calls["ascent"] == 20 and epochs == [1, 2]
    calls["ascent"] = 0
    resumed = run(tmp_path)  # isolation done; fine-tuning epoch 3; unlearning
    assert calls["ascent"] == 0 and epochs == [1, 2, 3]
    _same(resumed.model, straight.model)
    assert resumed.metrics["n_isolated"] == straight.metrics["n_isolated"] == 32
    assert resumed.metrics["resumed"] and not straight.metrics["resumed"]
    assert straight.seconds is None and resumed.seconds > resumed.metrics["isolation_seconds"] > 0


def test_a_grid_stopped_in_a_defence_resumes_it_and_then_drops_its_progress(tmp_path, monkeypatch):
    import json

    import poisonlab.defenses.abl as abl_module
    from poisonlab.experiments import parse_config, run_experiment

    cfg = parse_config({
        "name": "t", "seeds": [0], "dataset": {"name": "digits", "train_size": 300, "test_size": 150},
        "model": {"name": "fastnet"}, "training": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "attacks": [{"name": "badnets", "size": 2, "target": 0, "rate": 0.1}],
        "defenses": [{"name": "abl", "isolation_epochs": 2, "finetune_epochs": 2, "unlearning_epochs": 1,
                      "batch_size": 64}], "plots": False})
    real_fit, epochs = abl_module.fit, []

    def stop_after_one_epoch(*a, **k):
        def callback(rec, _):
            epochs.append(rec["epoch"])
            if len(epochs) == 1:
                raise KeyboardInterrupt  # the user stops the grid in ABL's fine-tuning

        return real_fit(*a, **k, epoch_callback=callback)

    monkeypatch.setattr(abl_module, "fit", stop_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path, progress=False, log=lambda s: None)
    progress = tmp_path / "cache" / "progress"
    (run_dir,) = progress.iterdir()
    assert sorted(f.name for f in run_dir.iterdir()) == ["abl_finetune.pt", "abl_isolation.pt"]
    said: list[str] = []
    run_experiment(cfg, tmp_path, progress=False, log=said.append)
    assert any("continuing: 1 unfinished defence run(s) from their progress files" in s for s in said)
    assert epochs == [1, 2]  # the second run trained the fine-tuning's second epoch only
    assert not run_dir.exists()  # stored: the progress files are gone
    (row,) = [r for r in json.loads((tmp_path / "results.json").read_text()) if r["defense"] != "none"]
    assert row["resumed"] is True  # and its seconds add up both processes' epochs, not the last one's clock
    parts = row["isolation_seconds"] + row["finetune_seconds"] + row["unlearning_seconds"]
    assert row["defense_seconds"] == pytest.approx(parts)


def test_a_cache_whose_progress_folder_is_a_link_keeps_no_progress(tmp_path):
    from poisonlab.experiments.cache import ArtifactCache

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "k").mkdir(parents=True)
    (elsewhere / "k" / "keep.txt").write_text("mine")
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.progress_dir("k") == tmp_path / "cache" / "progress" / "k"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "progress").symlink_to(elsewhere)
    with pytest.warns(UserWarning, match=r"cache/progress: not a plain folder"):
        assert cache.progress_dir("k") is None
    cache.drop_progress("k")
    assert (elsewhere / "k" / "keep.txt").read_text() == "mine"  # nothing outside the cache is touched


@pytest.mark.parametrize("name,params,unit,saves", [
    # ANP's 2,000 mask steps of 256 images take about 1.5 hours on the table's CIFAR-10 victim
    ("anp", {"iterations": 120, "batch_size": 32, "selection": "clean_accuracy"}, "iteration", [50, 100, 120]),
    ("ft_sam", {"epochs": 3, "batch_size": 64}, "epoch", [1, 2, 3]),
])
def test_a_stopped_repair_defence_continues_to_the_same_model(name, params, unit, saves, digits, tmp_path,
                                                              monkeypatch):
    from poisonlab.defenses import DefenseContext, get_defense
    from poisonlab.training.checkpoint import Checkpoint

    victim = _fit(digits[0].subset(np.arange(512)), epochs=1)[0]
    defence = get_defense(name, **params)

    def run(folder):
        ctx = DefenseContext(train=digits[0], model=victim, test=digits[1], train_model=None, seed=2,
                             clean_set=digits[0].subset(np.arange(300)), progress_dir=folder)
        return defence.run(ctx)

    straight = run(None)
    real_save, seen = Checkpoint.save, []

    def stop_after_second_save(self, state):
        real_save(self, state)
        seen.append(state[unit])
        if len(seen) == 2:
            raise Stop

    monkeypatch.setattr(Checkpoint, "save", stop_after_second_save)
    with pytest.raises(Stop):
        run(tmp_path)
    resumed = run(tmp_path)
    assert seen == saves  # the second sitting did only what was left
    _same(resumed.model, straight.model)
    for k, v in straight.metrics.items():
        if k not in ("resumed", "mask_seconds"):
            assert resumed.metrics[k] == v, k
    assert resumed.metrics["resumed"] and not straight.metrics["resumed"] and straight.seconds is None
    assert resumed.seconds > 0
