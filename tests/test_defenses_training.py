"""Training-time defences: robust recipe, learning-to-reweight, partition/bootstrap ensembles with DPA."""

import functools
import numpy as np
import pytest
import torch
from torch import nn

from helpers import train_small

from poisonlab.attacks import get_attack
from poisonlab.defenses import DefenseContext, get_defense
from poisonlab.defenses.ensemble import VoteEnsemble, dpa_certified_radius, hash_partition
from poisonlab.defenses.reweighting import L2RWeights
from poisonlab.errors import ParameterError
from poisonlab.metrics import evaluate
from poisonlab.training import predict_proba

_train_model = functools.partial(train_small, epochs=4)


@pytest.fixture(scope="module")
def small(digits):
    tr, te = digits
    return tr.stratified_subset(600, seed=0), te


def _ctx(train, test, **kw):
    return DefenseContext(**({"train": train, "model": None, "test": test, "train_model": _train_model,
                              "seed": 0} | kw))


# ------------------------------------------------------------------ robust training
@pytest.mark.parametrize("params,expected", [
    ({"label_smoothing": 0, "early_stopping": False}, {"brightness": 0.2, "contrast": 0.2, "flip": True}),
    ({"augment": False, "early_stopping": False}, {"label_smoothing": 0.1}),
    ({"augment": False, "label_smoothing": 0}, {"val_fraction": 0.1, "early_stopping_patience": 5,
                                                 "early_stopping_metric": "val_loss", "restore_best": True}),
])
def test_robust_training_each_part_alone(params, expected):
    assert get_defense("robust_training", **params).overrides() == expected


def test_robust_training_real_run_stops_early_and_restores_best(small):
    tr, te = small
    res = get_defense("robust_training", patience=1, flip=False).run(_ctx(tr, te))
    m = res.metrics
    assert m["overrides"]["label_smoothing"] == 0.1 and "best_val_loss" in m
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 4
    assert evaluate(res.model, te)["clean_acc"] > 0.4  # chance is 0.1


# ------------------------------------------------------------------ reweighting
def test_l2rw_weights_zero_out_flipped_labels(small):
    tr, te = small
    clean, rest = tr.subset(np.arange(200)), tr.subset(np.arange(200, 600))
    model = _train_model(rest, epochs=3)
    model.train()
    x, y = rest.float_tensor()[:128], torch.from_numpy(rest.labels[:128])
    flipped = torch.arange(128) % 2 == 0
    y_bad = torch.where(flipped, (y + 1) % 10, y)
    w = L2RWeights(clean, meta_batch_size=100)(model, x, y_bad)
    assert w.shape == (128,) and (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-5)
    assert w[flipped].sum() < 0.5 * w[~flipped].sum()
    assert (w[flipped] == 0).float().mean() > (w[~flipped] == 0).float().mean()


def test_reweighting_trains_through_ctx_train_model(small):
    tr, te = small
    poisoned, rec = get_attack("random_flip", rate=0.3).poison(tr.subset(np.arange(150, 600)), seed=0)
    res = get_defense("reweighting", meta_batch_size=64).run(
        _ctx(poisoned, te, clean_set=tr.subset(np.arange(150))))
    m = res.metrics
    assert m["weighted_batches"] == 4 * 8 and 0.2 < m["zero_weight_share"] < 0.9
    assert evaluate(res.model, te)["clean_acc"] > 0.3


def test_reweighting_needs_a_clean_set(small):
    tr, te = small
    with pytest.raises(ParameterError, match="trusted clean set"):
        get_defense("reweighting").run(_ctx(tr, te))
    with pytest.raises(ParameterError, match="clean set has 20 images"):
        get_defense("reweighting").run(_ctx(tr, te, clean_set=tr.subset(np.arange(20))))


# ------------------------------------------------------------------ ensembles
def test_dpa_radius_by_hand():
    votes = np.array([[5, 0, 0],   # unanimous of 5: (5 - 0) // 2
                      [2, 2, 1],   # tie -> class 0; runner-up 1 counts +0 (larger index): 0
                      [1, 3, 1],   # class 1; class 0 counts +1 -> 2: (3 - 2) // 2 = 0
                      [0, 4, 1],   # (4 - max(0 + 1, 1)) // 2 = 1
                      [0, 1, 4]])  # (4 - 2) // 2 = 1
    pred, radius = dpa_certified_radius(votes)
    assert pred.tolist() == [0, 0, 1, 1, 2]
    assert radius.tolist() == [2, 0, 0, 1, 1]


def test_vote_ensemble_majority_and_tie_break():
    class Const(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c, self.p = c, nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return nn.functional.one_hot(torch.full((len(x),), self.c), 3).float()

    x = torch.zeros(4, 1, 2, 2)
    assert VoteEnsemble([Const(2), Const(1), Const(2)], 3)(x).argmax(1).tolist() == [2] * 4
    assert VoteEnsemble([Const(2), Const(1)], 3)(x).argmax(1).tolist() == [1] * 4  # tie -> smaller class


def test_hash_partition_is_disjoint_deterministic_and_content_based(small):
    tr, _ = small
    a = hash_partition(tr.images, 4)
    assert a.min() >= 0 and a.max() == 3 and np.bincount(a).min() > 100
    assert np.array_equal(a, hash_partition(tr.images.copy(), 4))
    perm = np.random.default_rng(0).permutation(len(tr))
    assert np.array_equal(a[perm], hash_partition(tr.images[perm], 4))  # follows the image, not its position


def test_ensemble_partition_votes_and_certifies(small):
    tr, te = small
    def train_member(train, **kw):  # ~200 images each: more, smaller steps than the default recipe
        return _train_model(train, epochs=8, batch_size=32)

    res = get_defense("ensemble", k=3).run(_ctx(tr, te, train_model=train_member))
    m = res.metrics
    assert sum(m["member_sizes"]) == len(tr)
    acc = evaluate(res.model, te)["clean_acc"]
    member_acc = [evaluate(mm, te)["clean_acc"] for mm in res.model.members]
    assert acc > 0.6 and acc >= np.mean(member_acc)
    assert 0 < m["dpa_certified_share"][1] <= 1 and m["dpa_certified_acc"][1] <= acc
    assert 0 < m["dpa_mean_radius"] <= 1  # k=3: radius 1 at most
    # the returned module's argmax is the majority of the members
    member_pred = np.stack([predict_proba(mm, te).argmax(1) for mm in res.model.members])
    agree = (member_pred == member_pred[0]).all(0)
    assert (predict_proba(res.model, te).argmax(1)[agree] == member_pred[0][agree]).all()


def test_ensemble_bootstrap_members_and_errors(small):
    tr, _ = small
    sets = get_defense("ensemble", k=3, mode="bootstrap").member_indices(tr, seed=0)
    assert all(len(s) == len(tr) for s in sets) and len(np.unique(sets[0])) < len(tr)
    with pytest.raises(ParameterError, match="mode must be one of"):
        get_defense("ensemble", mode="boost")
    with pytest.raises(ParameterError, match="k must be in"):
        get_defense("ensemble", k=1)
    with pytest.raises(ParameterError, match="lower k"):
        get_defense("ensemble", k=100).member_indices(tr.subset(np.arange(300)), seed=0)
