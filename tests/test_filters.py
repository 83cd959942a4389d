"""Data-filtering defences on small real poisoned sets: each where it should work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from poisonlab.attacks import Poisoning, get_attack
from poisonlab.defenses import DEFENSES, DefenseContext, get_defense
from poisonlab.errors import ParameterError
from poisonlab.metrics import detection_metrics
from poisonlab.models import build_model
from poisonlab.training import TrainConfig, fit

FILTERS = ["loss_outliers", "activation_clustering", "kmeans_vote", "spectral_signatures", "pca_outliers",
           "kmeans_outliers", "pca_kmeans", "influence", "gradient_similarity", "confident_learning", "isolation_forest"]


def _trainer(model_name: str, channels: int, size: int, epochs: int, lr: float = 0.05, **kw):
    def train_model(train, sample_weight=None, **_):
        torch.manual_seed(0)
        m = build_model(model_name, channels, train.num_classes, size, **kw)
        fit(m, train, TrainConfig(epochs=epochs, batch_size=64, lr=lr), sample_weight=sample_weight, seed=0)
        return m
    return train_model


def _det(ctx, out):
    return detection_metrics(ctx.poisoning.poison_mask(len(ctx.train)), out.flagged, out.scores)


@pytest.fixture(scope="module")
def badnets_ctx(mnist_small):
    """2,000 MNIST images, 5% BadNets (5x5 white patch, target 0), mnist_cnn trained 6 epochs.

    The patch sits top-left: mnist_cnn's last unpadded conv + pooling never sees the bottom-right
    corner of a 28x28 image, so a bottom-right patch is not learnt at all.
    """
    # 2,000 images, not 1,200: on 1,200, activation clustering's recall moved between 0.57 and 1.0
    # with the thread count and the CPU's bf16 kernels (CI's CPU flipped the whitened variant to 0)
    tr, te = mnist_small
    # 5x5, not 4x4: with a 4x4 patch the poisons' features separated in some trainings and not in
    # others (one torch thread against two was enough to flip the detection rates)
    poisoned, rec = get_attack("badnets", rate=0.05, target=0, size=5, intensity=1.0,
                               corner="top-left").poison(tr, seed=0)
    train_model = _trainer("mnist_cnn", 1, 28, 6, lr=0.1)
    model = train_model(poisoned)
    return DefenseContext(train=poisoned, model=model, test=te.subset(np.arange(100)), train_model=train_model,
                          poisoning=rec)


@pytest.fixture(scope="module")
def flip_ctx(digits):
    """sklearn digits with 12% random label flips, a small fastnet."""
    tr, te = digits
    poisoned, rec = get_attack("random_flip", rate=0.12).poison(tr, seed=0)
    train_model = _trainer("fastnet", 1, 8, 6, widths=(16, 32, 64))
    return DefenseContext(train=poisoned, model=train_model(poisoned), test=te, train_model=train_model,
                          poisoning=rec)


def test_all_filters_registered():
    assert set(FILTERS) <= set(DEFENSES.names())
    for name in FILTERS:
        assert DEFENSES.get(name).kind == "filter"


@pytest.mark.parametrize("name,params,word", [
    ("loss_outliers", {"z_threshold": 0}, "z_threshold"),
    ("loss_outliers", {"drop_fraction": 1.5}, "drop_fraction"),
    ("activation_clustering", {"n_components": 0}, "n_components"),
    ("activation_clustering", {"size_threshold": 0.8}, "size_threshold"),
    ("activation_clustering", {"rule": "vote"}, "rule"),
    ("activation_clustering", {"reclassification_threshold": 0}, "reclassification_threshold"),
    ("kmeans_vote", {"n_clusters": 1}, "n_clusters"),
    ("spectral_signatures", {"expected_rate": 0}, "expected_rate"),
    ("spectral_signatures", {"expected_rate": 0.9}, "expected_rate"),
    ("pca_outliers", {"space": "logits"}, "space"),
    ("kmeans_outliers", {"n_clusters": 0}, "n_clusters"),
    ("pca_kmeans", {"z_threshold": -1}, "z_threshold"),
    ("influence", {"k": 0}, "k"),
    ("influence", {"test_indices": -3}, "test_indices"),
    ("influence", {"test_indices": "7,x"}, "test_indices"),
    ("influence", {"damping": 0}, "damping"),
    ("gradient_similarity", {"target_index": -3}, "target_index"),
    ("confident_learning", {"filter_by": "magic"}, "filter_by"),
    ("confident_learning", {"folds": 1}, "folds"),
    ("isolation_forest", {"contamination": 0.9}, "contamination"),
    ("isolation_forest", {"contamination": "most"}, "contamination"),
])
def test_parameter_validation(name, params, word):
    with pytest.raises(ParameterError, match=word):
        get_defense(name, **params)


def test_backdoor_cluster_detectors_on_mnist_badnets(badnets_ctx):
    ctx = badnets_ctx
    out = get_defense("activation_clustering").score(ctx)
    ac = _det(ctx, out)
    assert ac["det_recall"] >= 0.8 and ac["det_auroc"] >= 0.8, ac
    # the target class is judged poisoned and holds most flags (a clean class's natural sub-mode
    # sometimes passes the thresholds too: precision went from 0.445 to 1.0 over thread counts and
    # float32/bf16 on this set, so the bound only says the flags are not mostly clean)
    assert out.info["classes"]["0"]["suspicious"]
    removed = np.bincount(ctx.train.labels[out.flagged], minlength=10)
    assert removed.argmax() == 0 and ac["det_precision"] >= 0.35, ac
    # whitened by the other classes' covariance: a different feature space (its recall ranged from
    # 0.38 to 0.95 over thread counts and precisions on this small set, so only its bookkeeping is
    # checked here; benchmarks/ measures it)
    out_w = get_defense("activation_clustering", whiten=True).score(ctx)
    assert set(out_w.info["classes"]) == set(out.info["classes"])
    assert not np.allclose(out_w.scores, out.scores)
    # 100 poisons join 200 clean zeros: a third of the target class, Tran et al.'s epsilon
    out = get_defense("spectral_signatures", expected_rate=0.33).score(ctx)
    in0 = ctx.train.labels == 0
    from sklearn.metrics import roc_auc_score

    is_p = ctx.poisoning.poison_mask(len(ctx.train))
    assert roc_auc_score(is_p[in0], out.scores[in0]) >= 0.8
    assert out.flagged[is_p].mean() >= 0.6
    for name, auroc in (("pca_kmeans", 0.9), ("kmeans_outliers", 0.9), ("pca_outliers", 0.85),
                        ("isolation_forest", 0.6)):
        d = _det(ctx, get_defense(name).score(ctx))
        assert d["det_auroc"] >= auroc, (name, d)
    # the per-class PCA is computed once and shared through ctx.cache
    assert "class_pca_10" in ctx.cache


def test_activation_clustering_exclusionary_reclassification_on_mnist_badnets(badnets_ctx):
    """Chen et al.'s rule: a model trained without the candidate clusters sends the trigger cluster's
    members back to the classes their images come from, a clean class's sub-mode back to its label."""
    ctx = badnets_ctx
    calls = []

    def train_model(train, **kw):
        calls.append(len(train))
        return ctx.train_model(train, **kw)

    rctx = DefenseContext(train=ctx.train, model=ctx.model, test=ctx.test, train_model=train_model,
                          poisoning=ctx.poisoning, cache=ctx.cache)
    out = get_defense("activation_clustering", rule="exclusionary").score(rctx)
    info = out.info
    assert info["rule"] == "exclusionary_reclassification" and len(calls) == 1
    c0 = info["classes"]["0"]
    assert c0["decided_by"] == "exclusionary_reclassification" and c0["suspicious"]
    verdict = c0["reclassification"]
    assert verdict["source_class"] != 0 and verdict["p"] > verdict["l"]
    d = _det(ctx, out)
    assert d["det_recall"] >= 0.8 and d["det_precision"] >= 0.8, d
    # every candidate other than the target class went back to its label
    for c, v in info["classes"].items():
        if c != "0" and v["decided_by"] == "exclusionary_reclassification":
            assert not v["suspicious"], (c, v)
        if v["decided_by"] == "size":
            assert v["small_share"] > 0.35 and not v["suspicious"]


def test_filter_run_retrains_and_reports_detection(badnets_ctx):
    res = get_defense("activation_clustering").run(badnets_ctx)
    m = res.metrics
    assert m["det_recall"] >= 0.8 and res.kept.sum() == len(badnets_ctx.train) - m["n_flagged"]
    assert sum(m["removed_per_class"]) == m["n_flagged"] and np.argmax(m["removed_per_class"]) == 0
    assert m["filter_seconds"] > 0 and m["retrain_seconds"] > 0
    # the model was retrained on exactly the kept images
    seen = []
    ctx = dataclasses.replace(badnets_ctx, train_model=lambda train, **kw: seen.append(train) or badnets_ctx.model)
    res2 = get_defense("activation_clustering").run(ctx)
    assert len(seen) == 1 and np.array_equal(seen[0].images, badnets_ctx.train.images[res2.kept])
    # with every poison caught, the retrained model never saw the trigger and does not learn it (one
    # poison left among 1,900 images was enough for a 100% success rate in one training here)
    if m["det_recall"] == 1.0:
        trig = badnets_ctx.poisoning.apply_trigger(badnets_ctx.test.images)
        res.model.eval()
        pred = res.model(torch.from_numpy(trig).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
        keep = badnets_ctx.test.labels != 0
        assert (pred[keep] == 0).mean() < 0.3


def test_label_flip_detectors_on_digits(flip_ctx):
    ctx = flip_ctx
    cl = get_defense("confident_learning", folds=3).score(ctx)
    d = _det(ctx, cl)
    assert d["det_precision"] >= 0.8 and d["det_recall"] >= 0.6, d
    # suggested labels recover the original label of most caught flips
    sugg = np.asarray(cl.info["suggested_labels"])
    rec = ctx.poisoning
    caught = cl.flagged[rec.indices]
    assert (sugg[rec.indices][caught] == rec.original_labels[caught]).mean() >= 0.8
    lo = _det(ctx, get_defense("loss_outliers", cross_validated=True, folds=3).score(ctx))
    assert lo["det_auroc"] >= 0.9, lo
    kv = _det(ctx, get_defense("kmeans_vote").score(ctx))
    assert kv["det_precision"] >= 0.6 and kv["det_auroc"] >= 0.7, kv


def test_influence_finds_feature_space_neighbours_relabelled(digits):
    tr, te = digits
    # trained until the attack works (6 epochs at lr 0.05 left the target's probabilities near uniform:
    # no attack to find, and a last layer far from the optimum influence functions assume)
    train_model = _trainer("fastnet", 1, 8, 15, lr=0.2, widths=(16, 32, 64))
    clean = train_model(tr)
    from poisonlab.training import extract_features

    t = int(np.nonzero(te.labels == 4)[0][0])
    f_tr, f_t = extract_features(clean, tr), extract_features(clean, te.images[t:t + 1])[0]
    cand = np.nonzero(tr.labels == 4)[0]
    near = cand[np.argsort(((f_tr[cand] - f_t) ** 2).sum(1))[:40]]
    labels = tr.labels.copy()
    labels[near] = 5
    poisoned = tr.with_data(labels=labels)
    rec = Poisoning("manual_nn_flip", {}, np.sort(near), tr.labels[near], target_indices=np.array([t]),
                    adversarial_labels=np.array([5]))
    model = train_model(poisoned)
    from poisonlab.training import predict_proba

    assert predict_proba(model, te.images[t:t + 1])[0].argmax() == 5  # the 40 flips moved the target
    ctx = DefenseContext(train=poisoned, model=model, test=te, train_model=train_model, poisoning=rec)
    # Koh & Liang's influence, told only which test image to protect (not the attack or its class)
    out = get_defense("influence", k=40, test_indices=t).score(ctx)
    d = _det(ctx, out)
    assert d["det_recall"] >= 0.6 and d["det_auroc"] >= 0.9, d
    assert out.info["test_indices"] == [t] and out.info["predicted_loss_drop"] > 0
    assert np.array_equal(get_defense("influence", k=40, test_indices=str(t)).score(ctx).scores, out.scores)
    # the study's gradient similarity needs the target and the adversarial class
    gs = get_defense("gradient_similarity", k=40, target_index=t, adversarial_class=5).score(ctx)
    d = _det(ctx, gs)
    assert d["det_recall"] >= 0.6 and d["det_auroc"] >= 0.9, d
    # with oracle_target it reads them from the attack's record (evaluation only)
    out2 = get_defense("gradient_similarity", k=40, oracle_target=True).score(ctx)
    np.testing.assert_allclose(out2.scores, gs.scores)
    with pytest.raises(ParameterError, match="target_index"):
        get_defense("gradient_similarity", k=40).score(ctx)  # never read from the record unasked
    ctx.poisoning = None
    with pytest.raises(ParameterError, match="test_indices"):
        get_defense("influence").score(ctx)


def test_gradient_similarity_closed_form_matches_per_sample_autograd():
    from poisonlab.defenses.filters.influence import gradient_similarity_scores

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)

    class Wrapped(nn.Module):  # not recognisable as "Linear + parameter-free": takes the torch.func path
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x) * 0.5

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(50, 6)).astype(np.float32), rng.integers(0, 4, 50)
    target = rng.normal(size=6).astype(np.float32)
    closed = gradient_similarity_scores(nn.Sequential(lin, _Half()), feats, labels, target, 2)
    generic = gradient_similarity_scores(Wrapped(), feats, labels, target, 2, batch_size=16)
    np.testing.assert_allclose(closed, generic, rtol=1e-4, atol=1e-6)
    assert np.abs(closed).max() > 1e-3


class _Half(nn.Module):
    def forward(self, x):
        return x * 0.5


def test_plain_array_functions():
    from poisonlab.defenses.filters.confident_learning import confident_learning_scores
    from poisonlab.defenses.filters.spectral_signatures import spectral_signature_flags, spectral_signature_scores

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    labels = np.repeat([0, 1], 200)
    feats[:30, 3] += 6.0  # a shifted minority in class 0
    s = spectral_signature_scores(feats, labels)
    flags = spectral_signature_flags(s, labels, expected_rate=0.15)
    assert flags[:30].mean() >= 0.9 and flags.sum() == 2 * round(1.5 * 0.15 * 200)
    probs = np.full((10, 3), 0.05, dtype=np.float32)
    probs[np.arange(10), np.arange(10) % 3] = 0.9
    labels3 = np.arange(10) % 3
    labels3[0] = 1
    with pytest.raises(ParameterError, match="pred_probs"):
        confident_learning_scores(labels3, probs[:5])


def test_spectral_signatures_robust_centring_at_a_large_poison_share():
    """A third of a class poisoned (a tight cluster 3 units away along one direction): the class mean
    moves a third of the way to the poisons, the coordinate-wise median about a fifth, so the clean
    images' squared projections stay smaller under the median (issue 19: mean 0.84 by the algebra,
    median about 0.95, the uncentred projection higher still)."""
    from sklearn.metrics import roc_auc_score

    from poisonlab.defenses.filters.spectral_signatures import spectral_signature_scores

    rng = np.random.default_rng(0)
    n, p = 600, 200
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    feats[:p] *= 0.3
    feats[:p, 3] += 3.0
    labels = np.zeros(n, dtype=np.int64)
    is_p = np.arange(n) < p
    auc = {c: roc_auc_score(is_p, spectral_signature_scores(feats, labels, centering=c))
           for c in ("mean", "median", "none")}
    assert auc["median"] > auc["mean"] + 0.05 and auc["median"] >= 0.9 and auc["none"] >= 0.9, auc
    with pytest.raises(ParameterError, match="centering"):
        get_defense("spectral_signatures", centering="robust")
