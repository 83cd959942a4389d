"""The strong fast recipe (airnet + airbench presets), Muon, test-time augmentation, bf16/device rules."""

from unittest import mock

import numpy as np
import pytest
import torch

from poisonlab.models import build_model, count_parameters
from poisonlab.training import PRESETS, TrainConfig, fit, predict_proba
from poisonlab.training.augment import random_flip
from poisonlab.training.device import BF16_MIN_IMAGE_SIZE, resolve_device, use_bf16
from poisonlab.training.loop import _tta_views
from poisonlab.training.muon import orthogonalize
from poisonlab.training.perf import step_flops


def test_preact_resnet18_matches_backdoorbench_count():
    # BackdoorBench's models/preact_resnet.py PreActResNet18(10): 11,171,146 trainable parameters
    assert count_parameters(build_model("preact_resnet18", 3, 10, 32)) == 11_171_146


def test_airnet_count_and_frozen_parts():
    m = build_model("airnet", 3, 10, 32)
    assert count_parameters(m) == 1_971_352
    assert not m.stem.weight.requires_grad  # whitening filters are set from data and stay fixed
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns and all(not b.weight.requires_grad and b.bias.requires_grad for b in bns)


@pytest.mark.parametrize("size", [8, 32])
def test_bf16_auto_rule(size):
    """'auto' picks float32 for 8x8 images and bf16 for 32x32 on a CPU that reports bf16 support."""
    with mock.patch("poisonlab.training.device.fast_bf16", return_value=True):
        assert use_bf16("auto", "cpu", size) is (size >= BF16_MIN_IMAGE_SIZE)
        assert use_bf16(False, "cpu", 32) is False
    with mock.patch("poisonlab.training.device.fast_bf16", return_value=False):
        assert use_bf16("auto", "cpu", size) is False
        assert use_bf16(True, "cpu", 8) is True  # forced
    assert use_bf16("auto", "cuda", size) is True
    assert BF16_MIN_IMAGE_SIZE > 8 and BF16_MIN_IMAGE_SIZE <= 32
    with pytest.raises(ValueError, match="bf16"):
        use_bf16("sometimes", "cpu", 32)


def test_device_auto():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_in_configs_and_cli(tmp_path):
    from typer.testing import CliRunner

    from poisonlab.cli import app
    from poisonlab.errors import ConfigError
    from poisonlab.experiments.config import ExperimentConfig, parse_config, with_device

    assert ExperimentConfig().device == "auto"
    assert with_device(ExperimentConfig(), "cpu").device == "cpu"
    with pytest.raises(ConfigError, match="device"):
        parse_config({"device": "tpu"}, "grid.toml")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA device"):
            with_device(ExperimentConfig(), "cuda")
    cfg = tmp_path / "grid.toml"
    cfg.write_text('name = "x"\n')
    res = CliRunner().invoke(app, ["run", str(cfg), "--device", "gpu0", "--out", str(tmp_path / "o"), "--dry-run"])
    assert res.exit_code != 0 and "--device" in res.output and "Traceback" not in res.output


def test_preset_fills_only_unset_fields():
    cfg = TrainConfig(preset="airbench94", epochs=3)
    assert cfg.epochs == 3 and cfg.optimizer == "muon" and cfg.batch_size == PRESETS["airbench94"]["batch_size"]
    assert cfg.tta == "flip_translate" and cfg.tta_flip
    assert TrainConfig.model_validate(cfg.model_dump()) == cfg  # a dumped recipe reloads as itself
    with pytest.raises(Exception, match="preset"):
        TrainConfig(preset="airbench100")
    assert TrainConfig(tta_flip=True).tta == "flip"  # the older spelling still loads


def test_orthogonalize_singular_values():
    g = torch.randn(64, 200)
    s = torch.linalg.svdvals(orthogonalize(g).float())
    # Jordan's quintic iteration: singular values pushed into about [0.5, 1.5], not exactly 1
    assert s.min() > 0.3 and s.max() < 1.6


def test_tta_views_weights_and_shapes():
    x = torch.rand(2, 3, 8, 8)
    for tta, n in (("none", 1), ("flip", 2), ("flip_translate", 6)):
        views = _tta_views(x, tta)
        assert len(views) == n and sum(w for w, _ in views) == pytest.approx(1.0)
        assert all(v.shape == x.shape for _, v in views)
    shifted = _tta_views(x, "flip_translate")[2][1]
    assert torch.equal(shifted[..., 1:, 1:], x[..., :-1, :-1])  # one pixel down-right of the original


def test_flip_mask_flips_exactly_those():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = random_flip(x, mask=torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])


def test_stem_bias_trains_only_its_epochs(digits):
    tr, _ = digits
    torch.manual_seed(0)
    m = build_model("airnet", 1, 10, 8, widths=(16, 16, 16))
    seen = []
    cfg = TrainConfig(preset="airbench_quick", epochs=3, batch_size=256, stem_bias_epochs=1, bf16=False)
    fit(m, tr, cfg, seed=0, epoch_callback=lambda rec, model: seen.append(model.stem.bias.detach().clone()))
    assert not torch.equal(seen[0], torch.zeros_like(seen[0]))  # it moved in the first epoch
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # and not after
    assert m.stem.bias.requires_grad  # the model is left as built


def test_flop_count_matches_known_costs(digits, cifar_test):
    # airbench94's network: 0.708 GFLOP per 32x32 training image (forward + backward), fastnet 0.392
    data = cifar_test.subset(range(64))
    for name, expected in (("airnet", 0.708e9), ("fastnet", 0.392e9)):
        m = build_model(name, 3, 10, 32)
        cfg = TrainConfig(batch_size=64, bf16=False, optimizer="sgd")
        assert step_flops(m, data, cfg) / 64 == pytest.approx(expected, rel=0.02)
    # after the stem's epochs no gradient flows into the first convolution's input: cheaper
    m = build_model("airnet", 3, 10, 32)
    cfg = TrainConfig(preset="airbench94", batch_size=64, micro_batch_size=None, bf16=False)
    assert step_flops(m, data, cfg, stem_frozen=True) < step_flops(m, data, cfg)


def test_airbench_quick_learns_a_cifar_slice(data_root):
    """A short airbench_quick training on 2,000 CIFAR-10 images beats 40% on 1,000 test images."""
    from poisonlab.data import load_dataset

    tr = load_dataset("cifar10", "train", data_dir=data_root).stratified_subset(2000, seed=0)
    te = load_dataset("cifar10", "test", data_dir=data_root).stratified_subset(1000, seed=0)
    mean, std = tr.channel_stats()
    torch.manual_seed(0)
    m = build_model("airnet", 3, 10, 32, mean=mean, std=std, widths=(32, 64, 128))
    cfg = TrainConfig(preset="airbench_quick", epochs=6, batch_size=250, weight_decay=2e-6 * 250)
    fit(m, tr, cfg, seed=0)
    acc = float((predict_proba(m, te, tta=cfg.tta).argmax(1) == te.labels).mean())
    assert acc > 0.40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")
def test_short_training_on_cuda(digits):
    tr, te = digits
    m = build_model("airnet", 1, 10, 8, widths=(16, 32, 32))
    fit(m, tr, TrainConfig(preset="airbench_quick", epochs=2, batch_size=256), seed=0, device="cuda")
    assert next(m.parameters()).device.type == "cuda"
    probs = predict_proba(m, te)
    assert probs.shape == (len(te), 10) and np.isfinite(probs).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_accumulate_the_same_step(digits, reduction):
    """Without batch norm, splitting a batch into micro-batches gives the same update (weights included)."""
    tr, _ = digits
    data = tr.subset(range(128))
    weights = np.random.default_rng(0).uniform(0.1, 2.0, len(data)).astype(np.float32)
    params = []
    for micro in (None, 32):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        cfg = TrainConfig(epochs=1, batch_size=128, micro_batch_size=micro, loss_reduction=reduction, lr=0.01,
                          schedule="none", bf16=False)
        fit(m, data, cfg, sample_weight=weights, seed=0)
        params.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_micro_batches_keep_the_running_statistics_horizon(digits):
    tr, _ = digits
    m = build_model("airnet", 1, 10, 8, widths=(8, 8, 8))
    bn = next(b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    seen = []
    cfg = TrainConfig(epochs=1, batch_size=400, micro_batch_size=100, bf16=False)
    fit(m, tr, cfg, seed=0, epoch_callback=lambda rec, model: seen.append(bn.momentum))
    assert seen[0] == pytest.approx(1 - 0.6 ** 0.25)  # four updates a step average like one of 0.4
    assert bn.momentum == pytest.approx(0.4)  # restored
