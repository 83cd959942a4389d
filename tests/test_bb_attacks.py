"""BackdoorBench attacks (issue 18): wanet, input_aware, bpp, trojannn, low_frequency.

Each attack poisons a 2,000-image MNIST slice (bpp: a CIFAR-10 slice, whose natural colours make the
quantisation visible; MNIST is nearly binary) once per module; the contract tests and the
learnability tests share those poisoned sets and one clean surrogate model.
"""

import json

import numpy as np
import pytest
import torch

from poisonlab.attacks import ATTACKS, AttackContext, get_attack
from poisonlab.attacks.bpp import quantize
from poisonlab.attacks.low_frequency import gaussian_low_pass
from poisonlab.attacks.wanet import warp_grid
from poisonlab.errors import ParameterError
from poisonlab.experiments.cache import trigger_from_spec, trigger_to_spec
from poisonlab.metrics import evaluate
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit

NEW = ("wanet", "input_aware", "bpp", "trojannn", "low_frequency")
# budgets for a CPU test; everything else is the attack's default (the paper's / BackdoorBench's)
PARAMS = {
    "wanet": {},
    "bpp": {"neg_ratio": 0.5},
    "trojannn": {"steps": 40},
    "low_frequency": {"passes": 2, "n_images": 40, "max_iter_df": 50},
    # half the paper's cross-trigger samples: a victim trained from scratch on a fixed poisoned set tells
    # an image's own trigger from another image's more slowly than the classifier trained with G
    "input_aware": {"mask_steps": 100, "steps": 300, "batch_size": 64, "cross_ratio": 0.5},
}


def _train(train, poisoned, epochs=6):
    torch.manual_seed(0)
    m = build_model("fastnet", train.shape[2], train.num_classes, train.shape[0], *train.channel_stats(),
                    widths=(16, 32, 64))
    fit(m, poisoned, TrainConfig(epochs=epochs, batch_size=64, lr=0.05), seed=0)
    return m


@pytest.fixture(scope="module")
def cifar_small(data_root):
    from poisonlab.data import load_dataset

    tr = load_dataset("cifar10", "train", data_dir=data_root).stratified_subset(2000, seed=0)
    te = load_dataset("cifar10", "test", data_dir=data_root).stratified_subset(500, seed=0)
    return tr, te


@pytest.fixture(scope="module")
def surrogate(mnist_small):
    return _train(mnist_small[0], mnist_small[0], epochs=4)


@pytest.fixture(scope="module")
def poisoned(mnist_small, cifar_small, surrogate):
    """name -> (train, test, poisoned set, record), computed on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            tr, te = cifar_small if name == "bpp" else mnist_small
            ctx = AttackContext(clean_model=surrogate if ATTACKS.get(name).needs_clean_model else None)
            p, rec = get_attack(name, **PARAMS[name]).poison(tr, seed=0, context=ctx)
            cache[name] = (tr, te, p, rec)
        return cache[name]

    return get


def test_registered_with_defaults():
    for name in NEW:
        assert name in ATTACKS.names()
        a = get_attack(name)
        assert a.params()["rate"] == 0.1 and a.params()["target"] == 0
    w = get_attack("wanet")
    assert (w.k, w.s, w.grid_rescale, w.cross_ratio) == (4, 0.5, 1.0, 2.0)  # the WaNet settings


@pytest.mark.parametrize("name", NEW)
def test_touches_exactly_the_recorded_indices(name, poisoned):
    tr, te, p, rec = poisoned(name)
    changed = np.nonzero((p.images != tr.images).reshape(len(tr), -1).any(1) | (p.labels != tr.labels))[0]
    assert np.array_equal(changed, rec.indices)
    assert np.array_equal(rec.original_labels, tr.labels[rec.indices])
    relabelled = np.nonzero(p.labels != tr.labels)[0]
    assert len(relabelled) == round(0.1 * len(tr)) and (p.labels[relabelled] == 0).all()
    kept = np.setdiff1d(rec.indices, relabelled)  # cross / negative samples keep their label
    assert np.array_equal(p.labels[kept], tr.labels[kept])
    # the test-time trigger stamps test images, and is exactly the training-time one
    trig = rec.apply_trigger(te.images[:20])
    assert trig.shape == te.images[:20].shape and trig.dtype == np.uint8 and (trig != te.images[:20]).any()
    assert np.array_equal(rec.apply_trigger(tr.images[relabelled[:20]]), p.images[relabelled[:20]])


@pytest.mark.parametrize("name", NEW)
def test_trigger_survives_the_cache(name, poisoned):
    tr, te, _, rec = poisoned(name)
    spec, arrays = trigger_to_spec(rec.trigger)
    back = trigger_from_spec(json.loads(json.dumps(spec)), arrays)
    assert np.array_equal(back.apply(te.images[:16]), rec.apply_trigger(te.images[:16]))


@pytest.mark.parametrize("name", NEW)
def test_learnt_on_a_small_slice(name, poisoned):
    """ASR > 0.8 after 6 epochs of a narrow fastnet; clean accuracy stays that of a normal model."""
    tr, te, p, rec = poisoned(name)
    m = evaluate(_train(tr, p), te, rec)
    assert m["asr"] > 0.8, m["asr"]
    assert m["clean_acc"] > (0.3 if name == "bpp" else 0.9), m["clean_acc"]  # 2,000 CIFAR images: ~40%


def test_deterministic_for_a_seed(mnist_small):
    tr, _ = mnist_small
    a = get_attack("wanet")
    p1, r1 = a.poison(tr, seed=1)
    p2, r2 = a.poison(tr, seed=1)
    _, r3 = a.poison(tr, seed=2)
    assert np.array_equal(p1.images, p2.images) and np.array_equal(r1.indices, r2.indices)
    assert not np.array_equal(r1.indices, r3.indices)


def test_wanet_grid_is_a_small_smooth_warp():
    noise = np.random.default_rng(0).uniform(-1, 1, (2, 4, 4)).astype(np.float32)
    noise /= np.abs(noise).mean()
    ident = warp_grid(np.zeros_like(noise), 28, 28, 0.5, 1.0)
    g = warp_grid(noise, 28, 28, 0.5, 1.0)
    shift_px = (g - ident).abs() * 27 / 2  # grid units -> pixels
    assert 0.05 < float(shift_px.mean()) < 1.0 and float(shift_px.max()) < 2.0
    # neighbouring displacements differ little: the field is smooth
    assert float((g[:, 1:] - g[:, :-1] - (ident[:, 1:] - ident[:, :-1])).abs().max()) < 0.02


def test_bpp_quantisation():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    plain = quantize(imgs, 8, dithering=False)
    levels = np.unique(np.rint(np.arange(8) * 255 / 7)).astype(np.uint8)
    assert set(np.unique(plain)) <= set(levels)
    dith = quantize(imgs, 8, dithering=True)
    assert set(np.unique(dith)) <= set(levels) and not np.array_equal(dith, plain)
    # dithering spreads the error: local means stay closer to the original than plain rounding
    smooth = lambda a: a.astype(float).reshape(4, 3, 4, 3, 4, 3).mean((2, 4))  # noqa: E731
    assert np.abs(smooth(dith) - smooth(imgs)).mean() < np.abs(smooth(plain) - smooth(imgs)).mean()


def test_low_frequency_trigger_is_smooth(poisoned):
    _, _, _, rec = poisoned("low_frequency")
    v = rec.trigger.pattern[..., 0]
    assert 0 <= v.min() and v.max() == pytest.approx(0.2, abs=1e-5)  # rescaled to [0, amplitude]
    power = np.abs(np.fft.fft2(v - v.mean())) ** 2
    f = np.abs(np.fft.fftfreq(v.shape[0]))
    low = (f[:, None] <= 0.1) & (f[None, :] <= 0.1)
    assert power[low].sum() > 0.95 * power.sum()  # nearly all energy below 0.1 cycles per pixel
    noise = np.random.default_rng(0).random((1, 1, 28, 28)).astype(np.float32)
    blurred = gaussian_low_pass(torch.from_numpy(noise), 6.0)[0, 0].numpy()
    rough = lambda a: np.abs(np.diff(a, axis=-1)).mean()  # noqa: E731 - mean step between neighbours
    assert rough(blurred) < 0.05 * rough(noise[0, 0])


def test_trojannn_and_input_aware_records(poisoned, surrogate):
    _, _, _, rec = poisoned("trojannn")
    assert len(rec.extra["neurons"]) == 2
    pat = rec.trigger.pattern
    assert (pat[:-5, :] == 0).all() and (pat[:, :-5] == 0).all()  # only the 5x5 bottom-right square
    tr, te, _, rec = poisoned("input_aware")
    assert rec.extra["generator_seconds"] > 0 and rec.extra["n_cross"] > 0
    own = rec.trigger.apply(te.images[:1])
    other = rec.trigger.apply(te.images[:1], donors=te.images[1:2])  # image 1's trigger on image 0
    assert (own != other).any()  # each image gets its own trigger


@pytest.mark.parametrize("name,params,match", [
    ("wanet", {"k": 1}, "k must be in"),
    ("wanet", {"s": 0}, "s must be in"),
    ("wanet", {"cross_ratio": -1}, "cross_ratio must be in"),
    ("bpp", {"levels": 1}, "levels must be in"),
    ("bpp", {"dithering": "yes"}, "dithering must be true or false"),
    ("trojannn", {"corner": "middle"}, "corner must be one of"),
    ("trojannn", {"steps": 0}, "steps must be in"),
    ("low_frequency", {"amplitude": 0}, "amplitude must be in"),
    ("input_aware", {"mask_density": 0}, "mask_density must be in"),
    ("input_aware", {"rate": 2}, "rate must be in"),
])
def test_bad_parameters_fail_at_construction(name, params, match):
    with pytest.raises(ParameterError, match=match):
        get_attack(name, **params)


def test_bad_parameters_for_the_data(digits, mnist_small):
    tr, _ = digits
    with pytest.raises(ParameterError, match="needs .* samples"):
        get_attack("wanet", rate=0.4, cross_ratio=2).poison(tr)
    with pytest.raises(ParameterError, match="k=16 control points do not fit in 8x8"):
        get_attack("wanet", k=16).poison(tr)
    with pytest.raises(ParameterError, match="does not fit in 8x8"):
        get_attack("trojannn", size=9).poison(tr)
    odd = mnist_small[0].with_data(images=np.ascontiguousarray(mnist_small[0].images[:, :27, :27]))
    with pytest.raises(ParameterError, match="27x27 images do not fit"):
        get_attack("input_aware").poison(odd)
    with pytest.raises(ParameterError, match="target=12 is not a class"):
        get_attack("bpp", target=12).poison(tr)
