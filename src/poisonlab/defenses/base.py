"""The defence interface.

Defences act at one of four places (``Defense.kind``):

- ``filter``: score every training sample, drop the suspicious ones, retrain
  (sub-class :class:`Filter` and implement :meth:`Filter.score`);
- ``training``: change how the model is trained (augmentation, reweighting, ensembles);
- ``repair``: change a trained model using a small trusted clean set;
- ``detection``: flag triggered inputs at test time (the model is unchanged).

Every defence gets a :class:`DefenseContext` and returns a
:class:`DefenseResult` whose ``model`` the runner evaluates like any other.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.registry import Registry

if TYPE_CHECKING:
    from poisonlab.attacks.base import Poisoning


@dataclass
class DefenseContext:
    """Everything a defence may use.

    Attributes:
        train: the (possibly poisoned) training set, as the defender sees it.
        model: the model trained on ``train`` with the run's recipe.
        test: the test set (for evaluation inside detection defences only).
        clean_set: a small trusted clean set (``clean_fraction`` of the
            training data, disjoint from the poisoned indices).
        train_model: ``train_model(imageset, sample_weight=None, batch_weight_fn=None, **recipe_overrides)
            -> model``, the run's own training loop (:func:`poisonlab.training.fit`), for retraining;
            ``batch_weight_fn(model, x, y) -> (B,)`` reweights each batch as it is drawn (learning to reweight).
        poisoning: the attack's record. Ground truth: used for metrics only,
            a defence must not read it to make decisions.
        seed: the run's seed.
        cache: per-poisoned-set shared values (features, cross-validated
            probabilities), so that filters compute them once.
        progress: show progress bars.
        progress_dir: a folder where a long defence keeps its progress files
            (:mod:`poisonlab.training.checkpoint`), so that a stopped run continues where it
            was; None: no resuming. A grid gives each defence run a folder of its own in the
            cache and removes it once the run's result is stored.
    """

    train: ImageSet
    model: nn.Module
    test: ImageSet
    train_model: Callable[..., nn.Module]
    clean_set: ImageSet | None = None
    poisoning: "Poisoning | None" = None
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    progress_dir: Path | None = None

    def features(self) -> np.ndarray:
        """Penultimate features of ``model`` on ``train``, computed once.

        A model without a ``features(x)`` method is wrapped with one taken from a named layer
        (:func:`poisonlab.models.adapters.with_features`); without a named layer this raises a
        :class:`~poisonlab.errors.ConfigError` that says how to name one.
        """
        if "features" not in self.cache:
            from poisonlab.models.adapters import with_features
            from poisonlab.training.loop import extract_features

            self.cache["features"] = extract_features(with_features(self.model), self.train)
        return self.cache["features"]

    def pred_probs(self) -> np.ndarray:
        """``model``'s (in-sample) class probabilities on ``train``, computed once."""
        if "pred_probs" not in self.cache:
            from poisonlab.training.loop import predict_proba

            self.cache["pred_probs"] = predict_proba(self.model, self.train)
        return self.cache["pred_probs"]

    def cv_pred_probs(self, folds: int = 5) -> np.ndarray:
        """Out-of-sample probabilities on ``train`` from ``folds``-fold cross-validation, computed once."""
        key = f"cv_pred_probs_{folds}"
        if key not in self.cache:
            from poisonlab.training.crossval import cross_val_pred_probs

            self.cache[key] = cross_val_pred_probs(self.train_model, self.train, folds, self.seed)
        return self.cache[key]


@dataclass
class DefenseResult:
    """A defence's output: the model to evaluate, and metrics of its own (detection, timing ...).

    Attributes:
        model: the model the runner evaluates.
        metrics: JSON-able figures of the defence's own (detection, timing ...).
        kept: filters: boolean mask of the kept training samples.
        scores: filters: suspicion score per training sample.
        arrays: arrays for plots and analysis, cached with the run (e.g. Neural Cleanse's reversed masks,
            STRIP's entropies). Names are namespaced by the defence (``nc_mask``, ``strip_ent_clean``) and
            must not be ``kept``, ``scores`` or start with ``after_`` (the runner's own); keep them small
            (uint8 or float16 images, one float per test image).
        seconds: the defence's own count of its time when it spans several processes (a run resumed
            from ``ctx.progress_dir``: the runner's clock saw only the last one); None: the runner's clock.
    """

    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)
    kept: np.ndarray | None = None
    scores: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float | None = None


class Defense(ABC):
    """Base class of every defence."""

    kind: ClassVar[str] = "training"
    retrains: ClassVar[bool] = False  # True if run() trains a new model
    # images per class the trusted clean set must hold (0: the defence uses none); checked at plan time
    min_clean_per_class: ClassVar[int] = 0
    registry_name: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    @abstractmethod
    def run(self, ctx: DefenseContext) -> DefenseResult:
        """Apply the defence; return the model to evaluate and the defence's own metrics."""


@dataclass
class FilterOutput:
    """Suspicion score per training sample (higher = more suspicious) and the drop decision."""

    scores: np.ndarray
    flagged: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class Filter(Defense):
    """A data filter: :meth:`score` the training set, drop the flagged samples, retrain.

    Set ``retrain = False`` on an instance to score and flag only: the result then
    carries the detection metrics and the unchanged poisoned model (``kept`` still
    says what retraining would have used).
    """

    kind = "filter"
    retrains = True
    retrain: bool = True

    @abstractmethod
    def score(self, ctx: DefenseContext) -> FilterOutput:
        """Suspicion score and drop decision for every sample of ``ctx.train``."""

    def run(self, ctx: DefenseContext) -> DefenseResult:
        from poisonlab.metrics import detection_metrics

        t0 = time.perf_counter()
        out = self.score(ctx)
        t_score = time.perf_counter() - t0
        flagged = np.asarray(out.flagged, dtype=bool)
        keep = ~flagged
        if keep.sum() == 0:
            raise ValueError(f"{self.registry_name} flagged every training sample; nothing left to train on")
        t1 = time.perf_counter()
        model = ctx.train_model(ctx.train.subset(np.nonzero(keep)[0])) if self.retrain else ctx.model
        metrics: dict[str, Any] = {"filter_seconds": t_score, "retrain_seconds": time.perf_counter() - t1,
                                   "removed_per_class": np.bincount(ctx.train.labels[flagged],
                                                                    minlength=ctx.train.num_classes).tolist(),
                                   **out.info}
        if ctx.poisoning is not None:
            metrics.update(detection_metrics(ctx.poisoning.poison_mask(len(ctx.train)), flagged, out.scores))
        return DefenseResult(model=model, metrics=metrics, kept=keep, scores=np.asarray(out.scores))


DEFENSES: Registry[Defense] = Registry("defense")
