"""Repair and detection defences on one BadNets model of the digits data (trained once per module)."""

import functools
import copy

import numpy as np
import pytest
import torch

from helpers import WIDTHS, train_small

from poisonlab.attacks import get_attack
from poisonlab.defenses import DefenseContext, get_defense
from poisonlab.defenses.fine_pruning import layer_outputs, prune_point
from poisonlab.defenses.neural_cleanse import mad_anomaly_index
from poisonlab.defenses.strip import strip_entropy
from poisonlab.errors import ParameterError
from poisonlab.metrics import evaluate

_train_model = functools.partial(train_small, epochs=6)


@pytest.fixture(scope="module")
def poisoned(digits):
    tr, te = digits
    p, rec = get_attack("badnets", rate=0.1, size=1, intensity=1.0, target=0).poison(tr, seed=0)
    model = _train_model(p)
    before = evaluate(model, te, rec)
    assert before["asr"] > 0.9 and before["clean_acc"] > 0.8  # the backdoor is in
    clean_idx = np.setdiff1d(np.arange(len(tr)), rec.indices)
    clean = tr.subset(clean_idx).stratified_subset(300, seed=0)
    return p, rec, model, clean, before


def _ctx(digits, poisoned, **kw):
    p, rec, model, clean, _ = poisoned
    return DefenseContext(**({"train": p, "model": model, "test": digits[1], "train_model": _train_model,
                              "clean_set": clean, "poisoning": rec, "seed": 0} | kw))


def _run(name, digits, poisoned, **params):
    p, rec, model, clean, before = poisoned
    state = copy.deepcopy(model.state_dict())
    res = get_defense(name, **params).run(_ctx(digits, poisoned))
    for k, v in model.state_dict().items():  # the shared poisoned model is never modified
        assert torch.equal(v, state[k]), k
    return res, evaluate(res.model, digits[1], rec), before


def test_finetune_with_trigger_removes_backdoor_plain_does_less(digits, poisoned):
    res, after, before = _run("finetune_trigger", digits, poisoned, trigger_rate=0.1, epochs=10, batch_size=32)
    assert after["asr"] < 0.2 < before["asr"] - 0.6
    assert after["clean_acc"] > before["clean_acc"] - 0.08
    assert res.metrics["n_triggered"] == 30
    _, plain, _ = _run("finetune", digits, poisoned, epochs=10, batch_size=32)
    assert plain["asr"] > after["asr"] + 0.2  # clean data alone does not show the model the trigger
    assert plain["clean_acc"] > before["clean_acc"] - 0.08


def test_fine_pruning_prunes_within_margin_and_masks_stay(digits, poisoned):
    res, after, before = _run("fine_pruning", digits, poisoned, margin=0.1, epochs=3, batch_size=32)
    m = res.metrics
    assert 0 < m["pruned_channels"] < m["channels"] == WIDTHS[-1]
    assert m["clean_set_acc_pruned"] >= m["clean_set_acc_before"] - 0.1
    assert after["clean_acc"] > before["clean_acc"] - 0.1
    x = digits[1].float_tensor()[:50]
    point = prune_point(res.model, x)
    out = layer_outputs(res.model, point, x)
    dead = (out.abs().amax((0, 2, 3)) == 0).sum().item()
    assert dead >= m["pruned_channels"]  # pruned channels are still silent after fine-tuning
    assert m["pruned_output_max_abs"] == 0.0


def test_neural_cleanse_flags_the_target_and_unlearns(digits, poisoned):
    res, after, before = _run("neural_cleanse", digits, poisoned, steps=100, epochs=10, batch_size_finetune=32)
    m = res.metrics
    assert m["flagged_classes"] == [0], m
    assert m["anomaly_index"][0] > 2 and np.argmin(m["mask_l1"]) == 0
    # the reversed masks and patterns travel with the result (uint8) for the report's plot
    mask, pattern = res.arrays["nc_mask"], res.arrays["nc_pattern"]
    assert mask.dtype == pattern.dtype == np.uint8 and mask.shape == (10, 8, 8) and pattern.shape == (10, 8, 8, 1)
    assert np.argmin(mask.astype(int).sum((1, 2))) == 0
    assert after["asr"] < before["asr"] - 0.5
    assert after["clean_acc"] > before["clean_acc"] - 0.1


def test_strip_separates_triggered_from_clean(digits, poisoned):
    p, rec, model, clean, before = poisoned
    te = digits[1]
    keep = te.labels != 0
    ent_clean = strip_entropy(model, te.images[keep], clean, n=16)
    ent_trig = strip_entropy(model, rec.apply_trigger(te.images[keep]), clean, n=16)
    assert ent_trig.mean() < 0.7 * ent_clean.mean()
    assert np.median(ent_trig) < np.quantile(ent_clean, 0.02)
    res, after, _ = _run("strip", digits, poisoned, n=16, frr=0.05)
    m = res.metrics
    assert m["det_auroc"] > 0.9 and m["far"] < 0.3 and m["frr"] < 0.15, m
    assert after["asr"] < 0.3  # the gate rejects most triggered inputs
    # the entropies behind the metrics travel with the result for the report's histogram
    ec, et = res.arrays["strip_ent_clean"], res.arrays["strip_ent_trig"]
    assert ec.shape == (len(te),) and et.shape == (int(keep.sum()),)
    assert (ec < m["threshold"]).mean() == pytest.approx(m["frr"])
    assert (et >= m["threshold"]).mean() == pytest.approx(m["far"])
    res_off, after_off, _ = _run("strip", digits, poisoned, n=16, frr=0.05, reject=False)
    assert res_off.model is model and after_off["asr"] == pytest.approx(before["asr"])


def test_strip_entropy_is_batched_and_repeatable(digits, poisoned):
    _, _, model, clean, _ = poisoned
    x = digits[1].images[:40]
    a = strip_entropy(model, x, clean, n=8, batch_size=40)
    b = strip_entropy(model, x, clean, n=8, batch_size=40)
    assert a.shape == (40,) and np.array_equal(a, b) and (a >= 0).all() and (a <= np.log(10) + 1e-5).all()
    # bfloat16 autocast (the default where the CPU has bf16 units) moves entropies only slightly
    c32 = strip_entropy(model, x, clean, n=8, batch_size=40, bf16=False)
    c16 = strip_entropy(model, x, clean, n=8, batch_size=40, bf16=True)
    assert np.abs(c32 - c16).max() < 0.1 and np.corrcoef(c32, c16)[0, 1] > 0.95


def test_mad_anomaly_index():
    idx = mad_anomaly_index(np.array([10.0, 11, 9, 10, 12, 8, 10, 2.0]))
    assert idx[-1] > 2 and (idx[:-1] < 2).all()


@pytest.mark.parametrize("name,params,match", [
    ("fine_pruning", {"margin": 0}, "margin must be in"),
    ("fine_pruning", {"margin": 1.5}, "margin must be in"),
    ("finetune_trigger", {"trigger_rate": 0}, "trigger_rate must be in"),
    ("finetune", {"epochs": 0}, "epochs must be in"),
    ("neural_cleanse", {"threshold": -1}, "threshold must be in"),
    ("strip", {"frr": 0.9}, "frr must be in"),
    ("strip", {"n": 0}, "n must be in"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ParameterError, match=match):
        get_defense(name, **params)


@pytest.mark.parametrize("name", ["finetune", "finetune_trigger", "fine_pruning", "neural_cleanse", "strip"])
def test_clean_set_too_small(digits, poisoned, name):
    ctx = _ctx(digits, poisoned, clean_set=poisoned[3].subset(np.arange(12)))
    with pytest.raises(ParameterError, match="clean set has 12 images"):
        get_defense(name).run(ctx)


def test_finetune_trigger_needs_a_trigger(digits, poisoned):
    tr = digits[0]
    _, flip = get_attack("random_flip", rate=0.1).poison(tr, seed=0)
    with pytest.raises(ParameterError, match="knows the trigger"):
        get_defense("finetune_trigger").run(_ctx(digits, poisoned, poisoning=flip))


def test_finetunes_augment_like_backdoorbench(digits):
    """Crop 4 + flip on 32x32 colour images, crop 4 without flip on 28x28 grey ones, nothing on 8x8."""
    from poisonlab.data.imageset import ImageSet
    from poisonlab.defenses._repair import finetune_augment

    def blank(side, channels):
        return ImageSet(np.zeros((10, side, side, channels), np.uint8), np.arange(10), [str(i) for i in range(10)])

    assert finetune_augment(blank(32, 3)) == {"crop_padding": 4, "flip": True}
    assert finetune_augment(blank(28, 1)) == {"crop_padding": 4, "flip": False}
    assert finetune_augment(digits[0]) == {"crop_padding": 0, "flip": False}
