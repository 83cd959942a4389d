"""Ensembles by majority vote over partitions or bootstrap samples, with the certificate of deep partition
aggregation (Levine and Feizi, "Deep Partition Aggregation: Provable Defenses against General Poisoning
Attacks", ICLR 2021)."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.errors import ParameterError
from poisonlab.training.loop import predict_logits
from poisonlab.validate import check_choice, check_range


def hash_partition(images: np.ndarray, k: int) -> np.ndarray:
    """Partition id in ``[0, k)`` of each image, from a hash of its pixels only.

    As in DPA, the id depends on the image alone, so inserting, removing or
    relabelling one training sample changes at most one partition.
    """
    return np.fromiter((int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little") % k
                        for img in images), dtype=np.int64, count=len(images))


def dpa_certified_radius(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prediction and certified radius of each row of vote counts ``(N, K)`` (Levine and Feizi 2021, Thm. 1).

    The prediction is the most-voted class, ties to the smaller class index.
    The radius is ``(n_top - max_{c != top}(n_c + [c < top])) // 2``: the
    number of training samples an attacker may insert or remove (a changed
    sample counts as one of each, unless its image, and so its partition,
    stays the same) without changing the prediction.
    """
    votes = np.asarray(votes, dtype=np.int64)
    pred = votes.argmax(1)  # first maximum = smallest class index
    rows = np.arange(len(votes))
    other = votes + (np.arange(votes.shape[1])[None, :] < pred[:, None])
    other[rows, pred] = np.iinfo(np.int64).min
    return pred, (votes[rows, pred] - other.max(1)) // 2


class VoteEnsemble(nn.Module):
    """Majority vote of ``members``; its output is the vote count minus a tie-break below one vote.

    ``forward(x)`` returns ``votes - c / (2K)`` for class ``c``, so that its
    argmax is the majority class with ties broken towards the smaller class
    index; :meth:`votes` gives the raw counts.
    """

    def __init__(self, members: list[nn.Module], num_classes: int):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = num_classes

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros(len(x), self.num_classes, device=x.device)
        for m in self.members:
            counts += nn.functional.one_hot(m(x).argmax(1), self.num_classes).float()
        return counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tie = torch.arange(self.num_classes, device=x.device, dtype=torch.float32) / (2 * self.num_classes)
        return self.votes(x) - tie


@DEFENSES.register("ensemble")
class Ensemble(Defense):
    """``k`` models trained with the run's recipe on disjoint partitions or bootstrap samples; majority vote.

    Input: ``ctx.train`` (the poisoned set) and ``ctx.train_model``. With
    ``mode="partition"`` (deep partition aggregation) each training sample goes
    to one partition by a hash of its image; a poisoned sample then reaches one
    member only, and each test prediction gets a certified radius (see
    :func:`dpa_certified_radius`; DPA uses hundreds of partitions, the default
    here is 5 for CPU budgets, so radii are at most 2). With
    ``mode="bootstrap"`` (bagging) each member trains on ``len(train)`` samples
    drawn with replacement; no certificate. Output: a :class:`VoteEnsemble`.

    Metrics: member set sizes, training time; for partitions on the test set:
    ``dpa_mean_radius``, ``dpa_certified_share`` (share of predictions with
    radius >= r, r = 1..k//2) and ``dpa_certified_acc`` (correct AND radius >= r).
    The test set is used for these reports only.

    Args:
        k: number of members, >= 2.
        mode: ``partition`` or ``bootstrap``.
    """

    kind = "training"
    retrains = True

    def __init__(self, k: int = 5, mode: str = "partition"):
        self.k = int(check_range(k, "k", 2, 10_000))
        self.mode = check_choice(mode, "mode", ("partition", "bootstrap"))

    def member_indices(self, train: ImageSet, seed: int) -> list[np.ndarray]:
        """Training indices of each member."""
        if self.mode == "partition":
            part = hash_partition(train.images, self.k)
            sets = [np.nonzero(part == i)[0] for i in range(self.k)]
        else:
            rng = np.random.default_rng(seed)
            sets = [np.sort(rng.integers(0, len(train), len(train))) for _ in range(self.k)]
        small = min(len(s) for s in sets)
        if small < train.num_classes:
            raise ParameterError(f"ensemble: k={self.k} leaves a member with {small} training samples, fewer than "
                                 f"the {train.num_classes} classes; lower k")
        return sets

    def run(self, ctx: DefenseContext) -> DefenseResult:
        sets = self.member_indices(ctx.train, ctx.seed)
        t0 = time.perf_counter()
        members = [ctx.train_model(ctx.train.subset(s), description=f"ensemble {i + 1}/{self.k}")
                   for i, s in enumerate(sets)]
        model = VoteEnsemble(members, ctx.train.num_classes).eval()
        metrics: dict = {"member_sizes": [int(len(s)) for s in sets], "members_seconds": time.perf_counter() - t0}
        if self.mode == "partition":
            votes = predict_logits(_Votes(model), ctx.test).round().long().numpy()
            pred, radius = dpa_certified_radius(votes)
            correct = pred == ctx.test.labels
            rs = range(1, self.k // 2 + 1)
            metrics.update(dpa_mean_radius=float(radius.mean()),
                           dpa_certified_share={r: float((radius >= r).mean()) for r in rs},
                           dpa_certified_acc={r: float((correct & (radius >= r)).mean()) for r in rs})
            metrics["dpa_certified_acc_r1"] = metrics["dpa_certified_acc"].get(1, float("nan"))
        return DefenseResult(model=model, metrics=metrics)


class _Votes(nn.Module):
    """Raw vote counts as a module, so predict_logits batches them."""

    def __init__(self, ens: VoteEnsemble):
        super().__init__()
        self.ens = ens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ens.votes(x)
