"""Audit an image folder one did not collect oneself: find likely mislabelled
images and likely backdoor-trigger clusters, without any ground truth.

The pipeline (:func:`audit_imageset`):

1. k-fold cross-validation: every image gets class probabilities from a
   model that never saw it (what confident learning needs), and the last
   fold model gives penultimate features. The fold models are ``airnet``
   (32-64-128) with the ``airbench_quick`` recipe for 10 epochs where images
   are at least 16 pixels wide, ``fastnet`` with SGD below that (see
   :class:`AuditConfig`);
2. the filters that need no ground truth score every image: confident
   learning (label issues and a suggested label), activation clustering and
   spectral signatures (trigger clusters), PCA + k-means, isolation forest and
   the global k-means label vote (outliers);
3. evidence is combined into one suspicion score, a flag and the reasons:
   an image is flagged *likely mislabelled* when confident learning finds a
   label issue that the out-of-sample model is confident about and that is
   systematic (its given -> suggested pair holds at least ``min_pair_share``
   of the class and ``min_pair_concentration`` of the class's label issues,
   as flips from one class to another do) or all but certain; and *likely
   trigger cluster* when activation clustering, on features whitened by the
   other classes' covariance, finds a small, well separated cluster in a
   class that exceeds the median class by about the cluster's size (then as
   many images as the excess estimates are flagged). The other detectors'
   verdicts are listed as reasons but do not flag an image on their own (on
   natural data they mostly find hard, not poisoned, images).

:func:`audit_folder` reads the folder, runs the pipeline and writes
``OUT/suspicious.csv`` and a self-contained ``OUT/report.html``.
"""

from __future__ import annotations

import csv
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from poisonlab.data.imageset import ImageSet
from poisonlab.errors import DataError, ParameterError
from poisonlab.training.device import BF16_MIN_IMAGE_SIZE, resolve_device, use_bf16
from poisonlab.training.loop import PRESETS, TrainConfig

DETECTORS = ("confident_learning", "activation_clustering", "spectral_signatures", "pca_kmeans",
             "isolation_forest", "kmeans_vote")
FINDINGS = {"mislabelled": "likely mislabelled", "trigger": "likely trigger cluster"}
AIRNET_MIN_SIDE = 16
"""Smallest image side on which ``model="auto"`` trains ``airnet`` fold models (three 2x poolings)."""
HALF_LEARNT = ("seeded", "issues")
"""How :func:`trigger_cluster_flags` flags a class whose trigger the fold models learnt in part."""


@dataclass
class AuditConfig:
    """Settings of an audit (validated by :meth:`check`).

    Attributes:
        folds: k of the cross-validation, [2, 20].
        model: registry name of the network, or ``"auto"`` (default): ``airnet`` with the
            ``airbench_quick`` recipe where images are at least :data:`AIRNET_MIN_SIDE` pixels wide
            (on a 10,000-image CIFAR-10 folder of the audit suite's tuning half its fold models
            reached the accuracy of 20 bf16 epochs of ``fastnet`` in a quarter of the time), and
            ``fastnet`` with plain SGD on smaller images (airnet's three poolings need the size).
        preset: a training preset (``poisonlab list``) for the fold models; ``None`` (default):
            ``airbench_quick`` for ``model="auto"`` on images it takes, plain SGD (``lr``,
            ``batch_size``, ``augment``) otherwise.
        epochs: training epochs of each fold model, [1, 1000]; ``None`` (default): 10 with a
            preset, otherwise 20 where the fold models train under bf16 autocast and 8 without.
        widths: channel widths of ``fastnet`` and ``airnet`` (smaller = faster).
        batch_size: ``None`` (default): 500 with a preset, 128 with SGD (smaller on small folders).
        lr: the SGD recipe's learning rate (a preset has its own).
        augment: random crops and horizontal flips while training (SGD recipe; presets have them).
        min_pair_share: a label issue is flagged *likely mislabelled* only if its (given label,
            suggested label) pair holds at least this share of the given class's images, [0, 1] ...
        min_pair_concentration: ... and at least this share of the given class's label issues, [0, 1]
            (0 turns the test off; with ``min_pair_share=0.15`` that is the rule before the audit suite's
            draw 104) ...
            Both defaults were set on the audit suite's development draws 100-104 (55 folders; the report
            draw 105 was not looked at): flipping part of one class to another piles the class's label
            issues onto one pair (car <-> truck flips: 85-97% of the class's issues, at 6.3-19.7% of the
            class), while natural confusions spread them: in folders without flips no pair holding 6% of
            its class took more than 72% of the class's issues (always cat <-> dog, CIFAR-10's most
            confusable pair, whose share alone reached 9.7% and so cannot be told from flips by share: a
            share-only threshold of 0.09, set on draws 100-103, flagged ~90 natural dog -> cat issues in
            three of draw 104's 16 unflipped folders). Flips between cat and dog themselves are therefore
            not flagged unless the model is all but certain; the earlier 0.15 share-only rule (set on
            draws 0/1 with 20% flips) caught none of the 10%-pairwise folders' flips.
        certain_confidence: ... or if the out-of-sample model gives the suggested class at least
            this probability, [0, 1]. Scattered, less certain issues keep their score in the CSV.
        min_confidence: a label issue is flagged only if the out-of-sample model gives the suggested
            class at least this probability.
        ac_size_threshold, ac_silhouette_threshold: activation clustering's class-level criteria.
        require_class_excess: report a trigger cluster only in a class that holds more images than
            the median class, by about the cluster's size (0.5x to 2x): dirty-label backdoors grow
            their target class; natural sub-modes of a class do not. Turn off for folders whose
            classes are very unbalanced by nature.
        unlearned_poisons: in an inflated class, recognise a trigger the fold models did not learn
            (see :func:`trigger_cluster_flags`).
        unlearned_share: ... when the class's label issues beyond the other classes' rate reach this
            share of the estimated poisons, (0, 1].
        half_learnt: ``"seeded"`` (default) or ``"issues"``: how such a class's flags are chosen when
            the fold models learnt part of the trigger (:func:`trigger_cluster_flags`; chosen on the
            audit suite's development draws 100-105).
        clean_label_ratio: flag a clean-label trigger cluster in a class whose features, whitened by
            the other classes' covariance, vary along their top principal axis at least this many
            times as much as along the second (:func:`clean_label_flags`), [1, 1000]; ``None`` turns
            the clean-label path off.
        bf16: train the fold models under bfloat16 autocast. ``None`` (default): where the CPU has
            bf16 units (:func:`poisonlab.training.use_bf16`) and the images are at least 16 pixels
            wide; on this project's CPU that trains CIFAR-sized folds 2.4-2.8x faster, while on
            8x8 images bf16 is slower.
        seed: seeds folds, training and clustering.
    """

    folds: int = 4
    epochs: int | None = None
    model: str = "auto"
    preset: str | None = None
    widths: tuple[int, ...] = (32, 64, 128)
    batch_size: int | None = None
    lr: float = 0.1
    augment: bool = True
    min_confidence: float = 0.55
    min_pair_share: float = 0.06
    min_pair_concentration: float = 0.8
    certain_confidence: float = 0.995
    ac_size_threshold: float = 0.35
    ac_silhouette_threshold: float = 0.25
    require_class_excess: bool = True
    unlearned_poisons: bool = True
    unlearned_share: float = 0.25
    half_learnt: str = "seeded"
    clean_label_ratio: float | None = 3.1
    bf16: bool | None = None
    seed: int = 0

    def check(self) -> None:
        from poisonlab.validate import check_choice, check_range

        if not isinstance(self.folds, int) or not 2 <= self.folds <= 20:
            raise ParameterError(f"folds must be an integer in [2, 20], got {self.folds!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or not 1 <= self.epochs <= 1000):
            raise ParameterError(f"epochs must be an integer in [1, 1000], got {self.epochs!r}")
        check_range(self.min_confidence, "min_confidence", 0, 1)
        check_range(self.min_pair_share, "min_pair_share", 0, 1)
        check_range(self.min_pair_concentration, "min_pair_concentration", 0, 1)
        check_range(self.unlearned_share, "unlearned_share", 0, 1, lo_open=True)
        check_choice(self.half_learnt, "half_learnt", HALF_LEARNT)
        check_range(self.certain_confidence, "certain_confidence", 0, 1)
        check_range(self.ac_size_threshold, "ac_size_threshold", 0, 0.5, lo_open=True)
        check_range(self.ac_silhouette_threshold, "ac_silhouette_threshold", -1, 1)
        check_range(self.lr, "lr", 0, 100, lo_open=True)
        if self.clean_label_ratio is not None:
            check_range(self.clean_label_ratio, "clean_label_ratio", 1, 1000)
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 65536):
            raise ParameterError(f"batch_size must be an integer in [1, 65536], got {self.batch_size!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ParameterError(f"preset must be one of {', '.join(PRESETS)} or None, got {self.preset!r}")

    def fold_recipe(self, side: int) -> tuple[str, TrainConfig]:
        """The fold models' network name and training recipe for images ``side`` pixels wide."""
        small = side < BF16_MIN_IMAGE_SIZE
        bf16 = bool(use_bf16("auto" if self.bf16 is None else self.bf16, resolve_device("auto"), side))
        auto = self.model == "auto"
        model = ("airnet" if side >= AIRNET_MIN_SIDE else "fastnet") if auto else self.model
        preset = self.preset or ("airbench_quick" if auto and model == "airnet" else None)
        if preset:
            # no label smoothing: the rules read absolute probabilities (min_confidence, certain_confidence),
            # which smoothing caps; on a tuning folder it cost no accuracy (0.820 vs 0.822 held out)
            return model, TrainConfig(preset=preset, epochs=self.epochs or 10, batch_size=self.batch_size or 500,
                                      label_smoothing=0.0, bf16=bf16, tta="none")
        return model, TrainConfig(epochs=self.epochs or (20 if bf16 else 8), batch_size=self.batch_size or 128,
                                  lr=self.lr, label_smoothing=0.0, bf16=bf16,
                                  crop_padding=(0 if small else 2) if self.augment else 0,
                                  flip=self.augment and not small)


@dataclass
class AuditResult:
    """Per-image results of an audit (arrays aligned with the audited ImageSet)."""

    data: ImageSet
    score: np.ndarray
    flagged: np.ndarray
    finding: list[str]
    reasons: list[str]
    suggested: np.ndarray
    detector_scores: dict[str, np.ndarray]
    detector_flags: dict[str, np.ndarray]
    cv_pred_probs: np.ndarray
    class_info: dict[str, Any]
    features: np.ndarray | None = None
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def cv_accuracy(self) -> float:
        """Share of images whose cross-validated prediction is their given label."""
        return cv_accuracy(self.data.labels, self.cv_pred_probs)


def cv_accuracy(labels: np.ndarray, cv_probs: np.ndarray) -> float:
    """Share of images whose out-of-sample prediction (argmax of ``cv_probs``) is their given label."""
    return float((np.asarray(cv_probs).argmax(1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def _trainer(data: ImageSet, cfg: AuditConfig, progress: bool) -> Callable[..., torch.nn.Module]:
    from poisonlab.models import build_model_for
    from poisonlab.training.loop import fit
    from poisonlab.utils import seed_everything

    name, recipe = cfg.fold_recipe(min(data.shape[0], data.shape[1]))
    extra: dict[str, Any] = {"widths": tuple(cfg.widths)} if name in ("fastnet", "airnet") else {}

    def train_model(train: ImageSet, sample_weight: np.ndarray | None = None, description: str = "train",
                    **_: Any) -> torch.nn.Module:
        seed_everything(cfg.seed)
        model = build_model_for(name, data, **extra)
        # small folders: keep at least ~40 steps per epoch (SGD) or ~8 (a preset's large batches), or a few
        # epochs teach nothing
        bs = int(min(recipe.batch_size, max(32, len(train) // (8 if recipe.preset else 40))))
        fit(model, train, recipe.model_copy(update={"batch_size": bs}), sample_weight=sample_weight, seed=cfg.seed,
            progress=progress, description=description)
        return model

    return train_model


def cross_validate(data: ImageSet, cfg: AuditConfig, progress: bool = False,
                   log: Callable[[str], None] = lambda s: None) -> tuple[np.ndarray, np.ndarray]:
    """k-fold out-of-sample probabilities ``(N, K)`` and penultimate features ``(N, D)``.

    The features of all images come from the last fold model (trained on the
    other folds): one feature space for the per-class clustering, from a model
    that has learnt any trigger present in most of the data.
    """
    from poisonlab.training.crossval import cross_val_pred_probs
    from poisonlab.training.loop import extract_features

    counts = data.class_counts()
    folds = int(min(cfg.folds, counts[counts > 0].min())) if (counts > 0).any() else cfg.folds
    if folds < 2:
        raise DataError("every class needs at least 2 images for cross-validation; "
                        f"smallest class has {counts[counts > 0].min()}")
    last: list[torch.nn.Module] = []
    clock = [time.perf_counter()]

    def on_fold(i: int, model: torch.nn.Module, te: np.ndarray, fold_probs: np.ndarray) -> None:
        last[:] = [model]  # the features come from the last fold's model
        log(f"fold {i + 1}/{folds}: trained on {len(data) - len(te)}, out-of-sample accuracy "
            f"{(fold_probs.argmax(1) == data.labels[te]).mean():.3f} ({time.perf_counter() - clock[0]:.0f} s)")
        clock[0] = time.perf_counter()

    probs = cross_val_pred_probs(_trainer(data, cfg, progress), data, folds, cfg.seed, on_fold, describe=True)
    return probs, extract_features(last[0], data)


# ------------------------------------------------------------------ evidence rules
@dataclass(frozen=True)
class Detections:
    """What the ground-truth-free detectors say about every image."""

    scores: dict[str, np.ndarray]  # detector -> suspicion score (N,)
    flags: dict[str, np.ndarray]  # detector -> its own flag (N,)
    suggested: np.ndarray  # confident learning's suggested label (N,)
    class_info: dict[str, dict[str, Any]]  # activation clustering's per-class figures
    whitened: np.ndarray  # the features whitened by the other classes' covariance (N, D)


def run_detectors(labels: np.ndarray, cv_probs: np.ndarray, features: np.ndarray, cfg: AuditConfig) -> Detections:
    """Confident learning on ``cv_probs``; activation clustering, spectral signatures, PCA + k-means,
    isolation forest and the k-means label vote on ``features``."""
    from poisonlab.defenses.filters import other_class_whitened, per_class_pca
    from poisonlab.defenses.filters.activation_clustering import activation_clustering_scores
    from poisonlab.defenses.filters.confident_learning import confident_learning_scores
    from poisonlab.defenses.filters.isolation_forest import isolation_forest_scores
    from poisonlab.defenses.filters.kmeans_vote import kmeans_vote_scores
    from poisonlab.defenses.filters.pca_kmeans import pca_kmeans_scores
    from poisonlab.defenses.filters.pca_outliers import threshold_flags
    from poisonlab.defenses.filters.spectral_signatures import spectral_signature_scores

    y = np.asarray(labels)
    s: dict[str, np.ndarray] = {}
    f: dict[str, np.ndarray] = {}
    s["confident_learning"], f["confident_learning"], suggested = confident_learning_scores(
        y, cv_probs, min_confidence=cfg.min_confidence)
    # activation clustering runs on features whitened by the other classes' covariance: on
    # CIFAR-10 folders the plain per-class PCA split the target class along its natural variation
    # (a 40/60 split missing the poisons), the whitened one isolates the trigger cluster
    whitened = other_class_whitened(features, y)
    zw = per_class_pca(whitened, y, 10, cfg.seed)
    s["activation_clustering"], f["activation_clustering"], ac_info = activation_clustering_scores(
        zw, y, size_threshold=cfg.ac_size_threshold, silhouette_threshold=cfg.ac_silhouette_threshold,
        seed=cfg.seed, projected=True)
    for c, ratio in top_axis_ratios(zw, y).items():
        ac_info["classes"].setdefault(str(c), {})["top_axis_ratio"] = round(ratio, 3)
    s["spectral_signatures"] = spectral_signature_scores(features, y, cfg.seed)
    f["spectral_signatures"] = spectral_flags_in_clustered_classes(y, s["spectral_signatures"],
                                                                   f["activation_clustering"])
    s["pca_kmeans"] = pca_kmeans_scores(per_class_pca(features, y, 10, cfg.seed), y, seed=cfg.seed, projected=True)
    f["pca_kmeans"] = threshold_flags(s["pca_kmeans"], y, 3.0, None)
    s["isolation_forest"], f["isolation_forest"] = isolation_forest_scores(features, y, seed=cfg.seed)
    s["kmeans_vote"], f["kmeans_vote"], _ = kmeans_vote_scores(features, y, y.max() + 1 if len(y) else 2, cfg.seed)
    return Detections(s, f, suggested, ac_info["classes"], whitened)


def spectral_flags_in_clustered_classes(labels: np.ndarray, ss_scores: np.ndarray, ac_flags: np.ndarray) -> np.ndarray:
    """Spectral signatures' flags without an expected poison rate: in each class where activation
    clustering flagged ``k`` images, the ``k`` with the highest spectral-signature score."""
    from poisonlab.defenses.filters import class_indices, top_k_mask

    flags = np.zeros(len(labels), dtype=bool)
    for _, idx in class_indices(labels):
        k = int(ac_flags[idx].sum())
        if k:
            flags[idx[top_k_mask(ss_scores[idx], k)]] = True
    return flags


def class_excess(labels: np.ndarray) -> tuple[np.ndarray, float, int]:
    """``(counts per class, median count of the classes present, number of classes present)``."""
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    present = counts > 0
    return counts, float(np.median(counts[present])), int(present.sum())


def estimated_poisons(excess: float, n_classes: int) -> int:
    """Dirty-label poisons a class's excess over the median class suggests.

    Relabelled poisons leave the other classes too: with P of them taken evenly from K - 1
    classes, the target class exceeds the median class by P * K / (K - 1).
    """
    return int(round(max(excess, 0.0) * (n_classes - 1) / max(1, n_classes)))


def trigger_cluster_flags(labels: np.ndarray, ac_flags: np.ndarray, ac_scores: np.ndarray,
                          rank_scores: tuple[np.ndarray, np.ndarray], size_band: tuple[float, float] = (0.5, 2.0),
                          min_excess_sigmas: float = 3.0, min_excess_share: float = 0.1,
                          issues: np.ndarray | None = None, issue_scores: np.ndarray | None = None,
                          split_sizes: np.ndarray | None = None,
                          unlearned_share: float = AuditConfig.unlearned_share,
                          half_learnt: str = "seeded", whitened: np.ndarray | None = None,
                          ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Activation clustering's flags, kept only where a class is inflated as a dirty-label backdoor inflates it.

    Per class with excess ``e`` over the median class (see :func:`class_excess`):

    - a small cluster whose size is outside ``[size_band[0] * e, size_band[1] * e]`` (or with
      ``e <= 0``) is a natural sub-mode: its flags are dropped, and the class is judged as if it
      had no cluster (until the suite's first report draw an inflated class with such a sub-mode
      was let go: a natural-image blend on 10% of the folder, class 0 at 2.2x the median class,
      went unflagged);
    - a small cluster inside the band: the excess estimates the number of poisons better than
      2-means' cut, so the :func:`estimated_poisons` images with the highest ``ac_scores`` are flagged;
    - no small cluster, but a clearly inflated class (``e >= max(min_excess_sigmas * sqrt(median),
      min_excess_share * median)``): the excess estimates Tran et al.'s epsilon, so that many
      images are flagged, ranked by ``ac_scores`` when 2-means' smaller cluster (``split_sizes``,
      per class, whether or not it passed the silhouette test) is inside the size band (its size
      agreeing with the excess is evidence of its own), else by the mean within-class rank of the
      two ``rank_scores`` (spectral signatures, PCA + k-means).

    With ``issues`` (confident learning's label issues) and ``issue_scores`` (1 - p(given label)),
    a trigger the fold models did not learn is recognised: its poisons still look like their true
    classes, so they are label issues of the inflated class. When the class's issues beyond the
    other classes' median rate (:func:`unlearned_poisons`) make up at least ``unlearned_share`` of
    the estimated poisons, the estimate's worth of the class's images with the highest
    ``issue_scores`` is flagged instead of the cluster or rank choice (on the audit suite's tuning
    half, a 3x3 patch at 1-3% was not learned by the fold models and sat outside any cluster).
    ``unlearned_share`` was 0.5 until the suite's first report half (draw seed 101) showed a 3x3
    patch at 5% that the fold models learnt for about a quarter of its poisons: 0.47 of the
    estimate, a natural 2-means split chosen instead, precision 0.05. Over the draws 100 and 101
    learnt triggers gave 0.00-0.03 and unlearned or half-learnt ones 0.47-0.99; 0.25 sits between
    (draw 101 is therefore no longer held out; the suite reports a fresh draw).

    ``half_learnt="seeded"`` (default since the suite's draw 105 was scored): when the unlearned
    estimate is below the poison estimate, only that many are taken from the issues and the rest by
    :func:`seeded_flags`; ``"issues"`` takes the whole estimate from the issues (the rule before).
    On the development draws 100-105, where the worst folders were triggers learnt for 14-46% of their
    poisons, this raised a colour-gradient blend at 5% from 0.55-0.60 to 0.67-0.75 (precision
    about equal to recall) and a 3x3 patch at 5% from 0.56-0.81 to 0.80-0.91, and cost a 3x3 patch
    at 1% and 3% up to 0.02; it changes nothing where the fold models learnt the trigger or none of it.

    Returns:
        The new flags and, per class (str), the figures to add to the class report
        (``excess_over_median_class``, ``suspicious``, ``by_excess``, ``estimated_poisons``,
        ``unlearned_poisons``).
    """
    from poisonlab.defenses.filters import class_indices, top_k_mask

    flags = np.asarray(ac_flags, dtype=bool).copy()
    counts, median, n_classes = class_excess(labels)
    extra = (unlearned_poisons(labels, issues) if issues is not None and issue_scores is not None
             else np.zeros(len(counts), dtype=int))
    info: dict[str, dict[str, Any]] = {}
    for c, idx in class_indices(labels):
        small = int(flags[idx].sum())
        excess = float(counts[c] - median)
        n_poison = estimated_poisons(excess, n_classes)
        info[str(c)] = entry = {"excess_over_median_class": round(excess, 1)}
        if small and not (excess > 0 and size_band[0] * excess <= small <= size_band[1] * excess):
            # a natural sub-mode, not the excess; the class may still be inflated (next branches)
            flags[idx] = False
            small = 0
            entry["suspicious"] = False
        class_issues = issue_scores[idx] if issue_scores is not None else None
        if small and n_poison:
            score = poison_side(ac_scores[idx], class_issues, excess, size_band)
        elif excess >= max(min_excess_sigmas * np.sqrt(median), min_excess_share * median):
            split = int(split_sizes[c]) if split_sizes is not None and c < len(split_sizes) else 0
            if size_band[0] * excess <= split <= size_band[1] * excess:
                score = poison_side(ac_scores[idx], class_issues, excess, size_band)
                entry["split_matches_excess"] = True
            else:
                score = sum(np.argsort(np.argsort(r[idx])) for r in rank_scores) / 2.0
            entry.update(suspicious=True, by_excess=True)
        else:
            continue
        flags[idx] = False
        chosen = None
        if class_issues is not None and extra[c] >= unlearned_share * n_poison:  # an unlearned trigger
            entry["unlearned_poisons"] = int(extra[c])
            if half_learnt == "seeded" and whitened is not None and extra[c] < n_poison:
                chosen = seeded_flags(whitened[idx], class_issues, int(extra[c]), n_poison)
                entry["seeded_from_issues"] = True
            else:
                score = class_issues
        flags[idx[chosen if chosen is not None else top_k_mask(score, n_poison)]] = True
        entry["estimated_poisons"] = n_poison
    return flags, info


def poison_side(ac_scores: np.ndarray, issue_scores: np.ndarray | None, excess: float,
                size_band: tuple[float, float]) -> np.ndarray:
    """Within one class split by 2-means: a score ranking the side that holds the poisons first.

    ``ac_scores`` > 0 marks the smaller cluster (closer to its centre = higher). When both sides are
    0.5x-2x the class excess (a backdoor on about half the class), size cannot tell them apart; a
    trigger the fold models learnt is then predicted more surely than the class's natural images
    (on the audit suite's tuning half: mean p(given) 0.99 vs 0.76 and 0.95 vs 0.70), so the side
    with the lower mean ``issue_scores`` (1 - p(given)) is the poisons'. Otherwise the smaller side.
    """
    small = ac_scores > 0
    if issue_scores is None or small.all() or not small.any():
        return ac_scores
    lo, hi = size_band[0] * excess, size_band[1] * excess
    if not (lo <= small.sum() <= hi and lo <= (~small).sum() <= hi):
        return ac_scores
    return ac_scores if surer_is_small(small, issue_scores) else -ac_scores


def surer_is_small(small: np.ndarray, issue_scores: np.ndarray) -> bool:
    """Whether the ``small`` side of a split is predicted at least as surely (mean 1 - p(given)) as the rest."""
    return bool(issue_scores[small].mean() <= issue_scores[~small].mean())


def split_sizes(labels: np.ndarray, class_info: dict[str, dict[str, Any]]) -> np.ndarray:
    """Per class: the size of activation clustering's smaller 2-means cluster (0 where not split)."""
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    return np.array([int(round(class_info.get(str(c), {}).get("small_share", 0.0) * counts[c]))
                     for c in range(len(counts))])


def seeded_flags(z: np.ndarray, issue_scores: np.ndarray, n_seeds: int, n: int) -> np.ndarray:
    """``n`` flags in one class, for a trigger the fold models learnt for part of its poisons only.

    The unlearned part still looks like its true classes: the ``n_seeds`` images with the highest
    ``issue_scores`` (the unlearned estimate, :func:`unlearned_poisons`) are flagged as seeds. The
    learnt part is predicted as the class, but carries the trigger in the features ``z`` (the class's
    rows, whitened by the other classes' covariance): the other ``n - n_seeds`` flags go to the
    images furthest along the direction from the class's unseeded images to the seeds' mean.
    """
    from poisonlab.defenses.filters import top_k_mask

    seeds = top_k_mask(issue_scores, n_seeds)
    toward = z @ (z[seeds].mean(0) - z[~seeds].mean(0))
    return seeds | top_k_mask(np.where(seeds, -np.inf, toward), n - n_seeds)


def unlearned_poisons(labels: np.ndarray, issues: np.ndarray) -> np.ndarray:
    """Per class: its label issues beyond what the other classes' median issue rate predicts (>= 0).

    Hard images give every class some label issues; a dirty-label backdoor whose trigger the fold
    models did not learn adds its poisons (images of other classes) to the target class's issues.
    """
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    found = np.bincount(labels[np.asarray(issues, dtype=bool)], minlength=len(counts))
    rate = found / np.maximum(counts, 1)
    out = np.zeros(len(counts), dtype=int)
    for c in np.nonzero(counts)[0]:
        others = rate[(counts > 0) & (np.arange(len(counts)) != c)]
        base = float(np.median(others)) if len(others) else 0.0
        out[c] = max(0, int(round(found[c] - base * counts[c])))
    return out


def label_pair_shares(labels: np.ndarray, issues: np.ndarray, suggested: np.ndarray, n_classes: int,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per (given ``i``, suggested ``j``) pair of label issues: its share of class ``i``'s images and of
    class ``i``'s label issues.

    Returns:
        ``(share (K, K), concentration (K, K))``: ``share[i, j]`` = issues ``i -> j`` / images labelled ``i``;
        ``concentration[i, j]`` = issues ``i -> j`` / issues of class ``i`` (0 where the class has none).
    """
    y, issues = np.asarray(labels), np.asarray(issues, dtype=bool)
    pair = np.zeros((n_classes, n_classes))
    np.add.at(pair, (y[issues], np.asarray(suggested)[issues]), 1)
    share = pair / np.maximum(np.bincount(y, minlength=n_classes), 1)[:, None]
    return share, pair / np.maximum(pair.sum(1, keepdims=True), 1)


def systematic_label_issues(labels: np.ndarray, cv_probs: np.ndarray, issues: np.ndarray, suggested: np.ndarray,
                            min_pair_share: float, certain_confidence: float, min_pair_concentration: float = 0.0,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label issues that look like wrong labels rather than hard images.

    A cross-validated CPU model disagrees confidently with ~8% of a clean CIFAR-10 folder (hard
    images, not wrong labels), so an issue counts only where its (given -> suggested) pair is
    systematic, or where the model gives the suggested class at least ``certain_confidence``. A pair
    is systematic when it holds at least ``min_pair_share`` of the given class's images **and** at
    least ``min_pair_concentration`` of the class's label issues: flipping a share of one class to
    another piles the class's issues onto that one pair, while a class's natural confusions spread
    over several (see :class:`AuditConfig` for the figures behind the defaults).

    Returns:
        ``(mislabelled (N,) bool, share (K, K), systematic (K, K) bool)``, with ``share`` as
        :func:`label_pair_shares` gives it.
    """
    y, n, k = np.asarray(labels), len(labels), cv_probs.shape[1]
    share, concentration = label_pair_shares(y, issues, suggested, k)
    systematic = (share >= min_pair_share) & (concentration >= min_pair_concentration) & (share > 0)
    p_sug = cv_probs[np.arange(n), suggested]
    return issues & (systematic[y, suggested] | (p_sug >= certain_confidence)), share, systematic


def systematic_pairs(share: np.ndarray, systematic: np.ndarray) -> dict[str, dict[str, float]]:
    """For the report: per given class, the suggested classes of its systematic pairs and their shares."""
    out = {}
    for c in range(len(share)):
        js = np.nonzero(systematic[c])[0]
        if len(js):
            out[str(c)] = {str(int(j)): round(float(share[c, j]), 3) for j in js}
    return out


def top_axis_ratios(projected: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class: the variance of its first projected axis over that of its second.

    ``projected`` holds each class's rows on that class's principal axes, largest first
    (:func:`poisonlab.defenses.filters.per_class_pca`), so the ratio is the class's top eigenvalue over
    its second: how much one direction dominates the class's variation. Classes with fewer than three
    images, or a flat second axis, are left out.
    """
    from poisonlab.defenses.filters import class_indices

    out: dict[int, float] = {}
    for c, idx in class_indices(labels):
        z = projected[idx]
        if len(z) < 3 or z.shape[1] < 2:
            continue
        v = z[:, :2].astype(np.float64).var(0)
        if v[1] > 0:
            out[int(c)] = float(v[0] / v[1])
    return out


def clean_label_flags(labels: np.ndarray, ac_scores: np.ndarray, issue_scores: np.ndarray,
                      class_info: dict[str, dict[str, Any]], min_ratio: float, skip: set[int] = frozenset(),
                      ) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """A clean-label backdoor: a class dominated by one direction that the other classes do not vary in.

    A clean-label trigger (SIG, a patch on a share of one class, labels untouched) does not inflate
    its class, so the class-excess rule cannot see it. Once the fold models learn it, the poisoned
    images move along one direction in which clean images of every class hardly vary, so in features
    whitened by the other classes' covariance (as activation clustering sees them) that direction
    dominates the class: its top eigenvalue is several times its second. A class (not in ``skip``) is
    flagged when ``class_info[c]["top_axis_ratio"]`` (:func:`top_axis_ratios`) is at least
    ``min_ratio``; of activation clustering's 2-means split of the class, the side its images are
    predicted on more surely (lower mean ``issue_scores``, 1 - p(given): a learnt trigger is surer than
    the class's natural images) is flagged, unless it holds more than 60% of the class (then the odd
    side is wrongly labelled images, which also lie along one direction; the suite's clean-label
    targets' surer sides held 44-50% of their class).

    ``min_ratio`` (the audit's default 3.1) was set on the audit suite's development draws (seeds
    100-102: 10 folders, 88 classes no poison touched): unpoisoned classes reached at most 2.78 (dogs,
    whose natural sub-modes are what the previous silhouette rule mistook for triggers) and the five
    clean-label targets (SIG, a checkerboard patch) at least 3.44; 3.1 is about midway. The suite's
    report draw (seed 103) was not looked at when choosing it; the 60% guard and the skip of classes
    with systematic label issues only (not any flagged issue) were added after it was scored.
    Returns the flags and, per flagged class, ``clean_label_ratio`` and how many images were flagged.
    """
    flags = np.zeros(len(labels), dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for c in np.unique(labels):
        ratio = class_info.get(str(c), {}).get("top_axis_ratio")
        if int(c) in skip or ratio is None or ratio < min_ratio:
            continue
        idx = np.nonzero(labels == c)[0]
        small = ac_scores[idx] > 0
        if small.all() or not small.any():
            continue
        side = small if surer_is_small(small, issue_scores[idx]) else ~small
        if side.mean() > 0.6:
            # the surer side is most of the class: the odd side is images predicted as another class
            # (scattered wrong labels cluster along one direction too), not a trigger on part of it
            continue
        flags[idx[side]] = True
        out[str(int(c))] = {"clean_label_ratio": round(float(ratio), 2), "clean_label_flagged": int(side.sum())}
    return flags, out


def suspicion_score(flagged: np.ndarray, cl_scores: np.ndarray, ac_scores: np.ndarray) -> np.ndarray:
    """One score in [0, 1]: half the flag plus half the evidence (the probability that the label is
    wrong, or how clearly the image sits in a small, separated cluster), so flagged images always
    rank above unflagged ones."""
    return 0.5 * flagged + 0.5 * np.maximum(cl_scores, np.clip(ac_scores, 0, 1))


def combine_evidence(labels: np.ndarray, cv_probs: np.ndarray, features: np.ndarray, cfg: AuditConfig,
                     ) -> dict[str, Any]:
    """Run the ground-truth-free detectors on ``features``/``cv_probs`` and combine them with the rules above.

    Returns a dict with ``score, flagged, finding, reasons, suggested, detector_scores,
    detector_flags, class_info`` (see :class:`AuditResult`).
    """
    y = np.asarray(labels)
    det = run_detectors(y, cv_probs, features, cfg)
    s, f, info = det.scores, det.flags, det.class_info
    ac_flags = f["activation_clustering"]
    excess_info: dict[str, dict[str, Any]] = {}
    if cfg.require_class_excess:
        ac_flags, excess_info = trigger_cluster_flags(
            y, ac_flags, s["activation_clustering"], (s["spectral_signatures"], s["pca_kmeans"]),
            split_sizes=split_sizes(y, info), unlearned_share=cfg.unlearned_share, half_learnt=cfg.half_learnt,
            whitened=det.whitened,
            **({"issues": f["confident_learning"], "issue_scores": s["confident_learning"]}
               if cfg.unlearned_poisons else {}))
    else:
        counts, median, _ = class_excess(y)
        excess_info = {str(c): {"excess_over_median_class": round(float(counts[c] - median), 1)}
                       for c in np.unique(y)}
    for c, extra in excess_info.items():
        info.setdefault(c, {}).update(extra)
    mislabelled, share, systematic = systematic_label_issues(
        y, cv_probs, f["confident_learning"], det.suggested, cfg.min_pair_share, cfg.certain_confidence,
        cfg.min_pair_concentration)
    pairs = systematic_pairs(share, systematic)
    for c, to in pairs.items():
        info.setdefault(c, {})["systematic_issues_to"] = to
    clean_label = np.zeros(len(y), dtype=bool)
    if cfg.clean_label_ratio is not None:
        # classes another rule explains: a trigger cluster, or systematic label issues (flipped images
        # cluster in their given class too); one certain label issue, which any class may hold, is not
        # one (it vetoed SIG's class on the suite's draw 103)
        taken = {int(c) for c in np.unique(y[ac_flags])} | {int(c) for c in pairs}
        clean_label, cl_info = clean_label_flags(y, s["activation_clustering"], s["confident_learning"], info,
                                                 cfg.clean_label_ratio, skip=taken)
        for c, extra in cl_info.items():
            info.setdefault(c, {}).update(extra)
    trigger = (ac_flags | clean_label) & ~mislabelled
    flagged = mislabelled | trigger
    finding = np.where(mislabelled, "mislabelled", np.where(trigger, "trigger", "")).tolist()
    # a flagged row names the rule that decided it first, then every detector that flagged the image (a
    # trigger-cluster flag may come from the class-excess rule alone, with no detector flag of its own)
    trigger_rule = "trigger_cluster_rule(class_excess)" if cfg.require_class_excess else "trigger_cluster_rule"
    rule = np.where(mislabelled, "label_issue_rule",
                    np.where(clean_label & trigger, "clean_label_cluster_rule", np.where(trigger, trigger_rule, "")))
    reasons = [";".join(([rule[i]] if rule[i] else []) + [d for d in DETECTORS if f[d][i]]) for i in range(len(y))]
    return {"score": suspicion_score(flagged, s["confident_learning"], s["activation_clustering"]),
            "flagged": flagged, "finding": finding, "reasons": reasons, "suggested": det.suggested,
            "detector_scores": s, "detector_flags": f, "class_info": info}


def audit_imageset(data: ImageSet, cfg: AuditConfig | None = None, progress: bool = False,
                   log: Callable[[str], None] = lambda s: None) -> AuditResult:
    """Audit an in-memory labelled image set (see the module docstring for the method)."""
    cfg = cfg or AuditConfig()
    cfg.check()
    if len(data) < 2 * cfg.folds or len(np.unique(data.labels)) < 2:
        raise DataError(f"an audit needs at least {2 * cfg.folds} images in at least 2 classes, "
                        f"got {len(data)} in {len(np.unique(data.labels))}")
    t0 = time.perf_counter()
    probs, feats = cross_validate(data, cfg, progress, log)
    t1 = time.perf_counter()
    ev = combine_evidence(data.labels, probs, feats, cfg)
    t2 = time.perf_counter()
    warn = trust_warning(cv_accuracy(data.labels, probs), cfg)
    if warn:
        log(f"warning: {warn}")
    return AuditResult(data=data, cv_pred_probs=probs, features=feats, unreadable=list(data.meta.get("unreadable", [])),
                       seconds={"cross_validation": t1 - t0, "detectors": t2 - t1}, warnings=[warn] if warn else [],
                       **ev)


def trust_warning(cv_accuracy: float, cfg: AuditConfig) -> str | None:
    """A warning when the fold models are too weak for the audit's flags to mean much, else None.

    The rule is not fitted to any audit's figures: a label issue is flagged only when the fold model gives
    the suggested class at least ``min_confidence``, and a model right less often than that on held-out
    images cannot be trusted at that confidence (its confident suggestions are mostly its own errors);
    the feature-space detectors need features that separate the classes, which such a model lacks too.
    """
    if cv_accuracy >= cfg.min_confidence:
        return None
    return (f"the fold models' cross-validated accuracy is {cv_accuracy:.2f}, below the {cfg.min_confidence:.2f} "
            "confidence the label-issue rule asks of a suggestion, so these flags mean little; train the fold models "
            "longer (--epochs), keep more detail (--image-size), or audit more images per class")


# ------------------------------------------------------------------ output
def csv_columns() -> list[str]:
    return ["path", "label", "suggested_label", "score", "flagged", "finding", "reasons"] + \
        [f"score_{d}" for d in DETECTORS]


def write_csv(result: AuditResult, path: Path) -> None:
    """``suspicious.csv``: one row per image, most suspicious first; unreadable files at the end.

    Paths and class names come from the audited folder: a cell a spreadsheet would evaluate (``=1+2``)
    is written with a leading apostrophe."""
    from poisonlab.report.tables import spreadsheet_safe as safe
    from poisonlab.utils import atomic_write_text

    d = result.data
    names = d.classes
    paths = d.paths or [str(i) for i in range(len(d))]
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(csv_columns())
    for i in np.argsort(-result.score, kind="stable"):
        wr.writerow([safe(paths[i]), safe(names[d.labels[i]]), safe(names[result.suggested[i]]),
                     f"{result.score[i]:.6f}", int(result.flagged[i]), FINDINGS.get(result.finding[i], ""),
                     result.reasons[i]] + [f"{result.detector_scores[k][i]:.6g}" for k in DETECTORS])
    for rel, why in result.unreadable:
        wr.writerow([safe(rel), safe(Path(rel).parts[0]) if Path(rel).parts else "", "", "", "", "unreadable",
                     safe(why)] + [""] * len(DETECTORS))
    atomic_write_text(path, buf.getvalue())


_CSS = """td:first-child{text-align:left}th{background:#f3f3f3}
.g{display:flex;flex-wrap:wrap;gap:.5em}.c{width:120px;font-size:11px;word-break:break-all;border:1px solid #ddd;padding:3px}
.c img{width:112px;height:112px;image-rendering:pixelated;display:block}.s{color:#a00}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:.5em}"""

_DETECTORS_NOTE = (
    "<h2>Detectors</h2><p>Likely mislabelled = a confident-learning label issue (Northcutt et al. "
    "2021, k-fold out-of-sample probabilities, suggested class at least min_confidence probable) "
    "in a systematic (given &rarr; suggested) pair holding at least min_pair_share of the given "
    "class and min_pair_concentration of its label issues, or with the suggested class all but certain. Likely trigger cluster = the images "
    "closest to the small cluster of a class that activation clustering (Chen et al. 2018, on "
    "features whitened by the other classes' covariance) finds suspicious and that exceeds the "
    "median class, as many as the excess estimates. Spectral signatures (Tran et al. 2018), "
    "PCA + k-means, isolation forest and the global k-means label vote are listed as reasons "
    "only.</p>")


def write_html(result: AuditResult, path: Path, max_per_gallery: int = 120) -> None:
    """``report.html``: self-contained (images embedded as base64 PNG), galleries grouped by finding."""
    from poisonlab.report.page import html_page
    from poisonlab.utils import atomic_write_text

    d = result.data
    parts = [f"<h1>Audit of {html.escape(str(d.meta.get('root', d.name)))}</h1>", _overview(result),
             _class_table(result)] + _trigger_section(result)
    for key, title in FINDINGS.items():
        parts += _gallery(result, key, title, max_per_gallery)
    parts += _unreadable_table(result.unreadable)
    parts.append(_DETECTORS_NOTE)
    atomic_write_text(path, html_page(f"poisonlab audit: {d.name}", parts, _CSS))


def _overview(result: AuditResult) -> str:
    d = result.data
    warn = "".join(f'<p class="warn"><b>Warning:</b> {html.escape(w)}</p>' for w in result.warnings)
    return warn + (f"<p>{len(d)} images in {d.num_classes} classes; {int(result.flagged.sum())} flagged "
            f"({int(sum(x == 'mislabelled' for x in result.finding))} likely mislabelled, "
            f"{int(sum(x == 'trigger' for x in result.finding))} in likely trigger clusters); "
            f"{len(result.unreadable)} unreadable. Cross-validated accuracy "
            f"{result.cv_accuracy:.3f}. "
            f"Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) + ".</p>")


def _class_table(result: AuditResult) -> str:
    d, e = result.data, html.escape
    names = d.classes
    rows = ["<h2>Per class</h2><table><tr><th>class</th><th>images</th><th>likely mislabelled</th>"
            "<th>likely trigger cluster</th><th>small cluster share</th><th>silhouette</th><th>top-axis ratio</th>"
            "<th>cross-validated accuracy</th><th>systematic label issues</th><th>why suspect</th></tr>"]
    pred = result.cv_pred_probs.argmax(1)
    for c, name in enumerate(names):
        m = d.labels == c
        info = result.class_info.get(str(c), {})
        mis = int(sum(result.finding[i] == "mislabelled" for i in np.nonzero(m)[0]))
        trg = int(sum(result.finding[i] == "trigger" for i in np.nonzero(m)[0]))
        acc = (pred[m] == c).mean() if m.any() else float("nan")
        pairs = ", ".join(f"&rarr; {e(names[int(j)])} ({100 * v:.0f}%)"
                          for j, v in info.get("systematic_issues_to", {}).items() if int(j) < len(names))
        rows.append(f"<tr><td>{e(name)}</td><td>{int(m.sum())}</td><td>{mis}</td>"
                    f"<td{' class=s' if trg else ''}>{trg}</td><td>{info.get('small_share', '')}</td>"
                    f"<td>{info.get('silhouette', '')}</td><td>{info.get('top_axis_ratio', '')}</td>"
                    f"<td>{acc:.3f}</td><td>{pairs}</td>"
                    f"<td style='text-align:left'>{e(why_suspect(info, names, trg, mis))}</td></tr>")
    return "".join(rows) + "</table>"


def why_suspect(info: dict[str, Any], names: list[str], n_trigger: int, n_mislabelled: int) -> str:
    """One sentence per class: the evidence behind its flags (class excess, cluster split, label-issue pairs),
    or why a split that was found did not count; empty when there is nothing to say.

    ``info`` is the class's entry of :attr:`AuditResult.class_info`; ``n_trigger`` and ``n_mislabelled``
    its flagged images by finding.
    """
    parts = []
    excess = info.get("excess_over_median_class")
    split = (f"activation clustering splits off a small cluster ({100 * info['small_share']:.0f}% of the class, "
             f"silhouette {info['silhouette']:.2f})" if "small_share" in info and "silhouette" in info else "")
    if n_trigger and "clean_label_ratio" in info:
        parts.append(f"not inflated, but its features (whitened by the other classes) vary "
                     f"{info['clean_label_ratio']:.1f}x as much along one direction as along any other, as a "
                     f"learnt clean-label trigger makes them; the {n_trigger} images of the more surely predicted "
                     "side of its cluster split are flagged")
    elif n_trigger and info.get("by_excess"):
        parts.append(f"holds {excess:.0f} images more than the median class with no clean cluster split; the "
                     f"{n_trigger} images ranked most atypical by spectral signatures and PCA + k-means are flagged")
    elif n_trigger:
        parts.append((f"holds {excess:.0f} images more than the median class, and " if excess is not None else "")
                     + (split or "a small cluster splits off") + f"; its {n_trigger} images nearest that cluster "
                     "are flagged as a trigger cluster")
    elif info.get("suspicious") is False and split and info.get("decided_by") not in ("size", "silhouette"):
        parts.append(split + ", but the class is not inflated by about the cluster's size, so the cluster is "
                     "read as a natural sub-mode and not flagged")
    for j, share in info.get("systematic_issues_to", {}).items():
        if int(j) < len(names):
            parts.append(f"{100 * share:.0f}% of its images are confidently predicted as {names[int(j)]}, most of "
                         "the class's label issues (a systematic label issue)")
    if n_mislabelled and not info.get("systematic_issues_to"):
        parts.append(f"{n_mislabelled} images are all but certainly another class")
    return "; ".join(parts)


def trigger_evidence(result: AuditResult, nearest: int = 8) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per class with trigger-cluster flags: ``(class, difference image, nearest)``.

    The difference image is the mean of the class's flagged images minus the mean of its other images,
    rescaled to uint8 (a patch or blend pattern shared by the flagged images shows up in it; natural
    content averages out); ``nearest`` are the indices of the flagged images closest to the small
    cluster (highest activation-clustering score), at most ``nearest`` of them.
    """
    d, out = result.data, []
    trig = np.asarray([f == "trigger" for f in result.finding])
    ac = result.detector_scores.get("activation_clustering", result.score)
    for c in np.unique(d.labels[trig]) if trig.any() else []:
        inside, rest = trig & (d.labels == c), ~trig & (d.labels == c)
        if not rest.any():
            continue
        diff = d.images[inside].astype(np.float32).mean(0) - d.images[rest].astype(np.float32).mean(0)
        span = float(diff.max() - diff.min())
        img = ((diff - diff.min()) / span * 255 if span > 0 else np.zeros_like(diff)).astype(np.uint8)
        idx = np.nonzero(inside)[0]
        out.append((int(c), img, idx[np.argsort(-ac[idx], kind="stable")[:nearest]]))
    return out


def _trigger_section(result: AuditResult) -> list[str]:
    from poisonlab.report.page import image_data_uri

    views = trigger_evidence(result)
    if not views:
        return []
    d, e = result.data, html.escape
    scale = max(1, 96 // max(1, d.shape[0]))
    parts = ["<h2>Suspected triggers</h2><p>Per class with a likely trigger cluster: the mean of its flagged images "
             "minus the mean of its other images (a pattern the flagged images share shows up; natural content "
             "averages out), and the flagged images nearest the cluster.</p>"]
    for c, diff, nearest in views:
        parts.append(f"<h3>{e(d.classes[c])}</h3><div class=g><div class=c><img alt='difference' "
                     f"src='{image_data_uri(diff, scale)}'>flagged minus other images</div>")
        paths = d.paths or [str(i) for i in range(len(d))]
        parts += [f"<div class=c><img alt='{e(paths[i])}' src='{image_data_uri(d.images[i], scale)}'>"
                  f"{e(paths[i])}</div>" for i in nearest]
        parts.append("</div>")
    return parts


def _gallery(result: AuditResult, key: str, title: str, max_per_gallery: int) -> list[str]:
    """The images of one finding, most suspicious first, grouped by their given label."""
    from poisonlab.report.page import image_data_uri

    d, e = result.data, html.escape
    names, paths = d.classes, d.paths or [str(i) for i in range(len(d))]
    scale = max(1, 96 // max(1, d.shape[0]))
    idx = [i for i in np.argsort(-result.score, kind="stable") if result.finding[i] == key]
    parts = [f"<h2>{e(title)} ({len(idx)})</h2>"]
    if not idx:
        return parts + ["<p>none</p>"]
    if len(idx) > max_per_gallery:
        parts.append(f"<p>showing the {max_per_gallery} most suspicious; all are in suspicious.csv</p>")
    groups: dict[int, list[int]] = {}
    for i in idx[:max_per_gallery]:
        groups.setdefault(int(d.labels[i]), []).append(int(i))
    for c, members in sorted(groups.items()):
        parts.append(f"<h3>labelled {e(names[c])} ({len(members)})</h3><div class=g>")
        for i in members:
            cap = (f"{e(paths[i])}<br>label {e(names[d.labels[i]])}"
                   + (f" &rarr; <b>{e(names[result.suggested[i]])}</b>" if key == "mislabelled" else "")
                   + f"<br>score {result.score[i]:.3f}<br>{e(result.reasons[i].replace(';', ', '))}")
            parts.append(f"<div class=c><img alt='{e(paths[i])}' src='{image_data_uri(d.images[i], scale)}'>"
                         f"{cap}</div>")
        parts.append("</div>")
    return parts


def _unreadable_table(unreadable: list[tuple[str, str]]) -> list[str]:
    if not unreadable:
        return []
    e = html.escape
    return ([f"<h2>Unreadable files ({len(unreadable)})</h2><table><tr><th>path</th><th>error</th></tr>"]
            + [f"<tr><td>{e(p)}</td><td style='text-align:left'>{e(w)}</td></tr>" for p, w in unreadable]
            + ["</table>"])


def audit_folder(folder: str | Path, out: str | Path, cfg: AuditConfig | None = None, image_size: int = 32,
                 channels: int = 3, progress: bool = False, log: Callable[[str], None] = lambda s: None,
                 ) -> AuditResult:
    """Audit the image folder ``folder`` (one sub-folder per class) and write the results under ``out``.

    Writes ``out/suspicious.csv`` and ``out/report.html``; returns the :class:`AuditResult`.
    Unreadable images are listed in both, not fatal.
    """
    import warnings

    from poisonlab.data.readers import read_image_folder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unreadable files are reported in the outputs instead
        data = read_image_folder(folder, size=image_size, channels=channels)
    if data.meta.get("unreadable"):
        log(f"{len(data.meta['unreadable'])} unreadable file(s) skipped (listed in the report)")
    log(f"{folder}: {len(data)} images, {data.num_classes} classes")
    result = audit_imageset(data, cfg, progress, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / "suspicious.csv")
    write_html(result, out / "report.html")
    return result
