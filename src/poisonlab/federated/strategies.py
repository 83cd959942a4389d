"""Flower strategies that record which clients they left out each round.

Each aggregator is a Flower message-API strategy: Flower's own ``FedAvg``,
``FedMedian``, ``FedTrimmedAvg``, ``MultiKrum`` (Krum = one selected) and
``DifferentialPrivacyServerSideFixedClipping`` (norm clipping with optional
Gaussian noise) do the aggregation; a mixin adds an audit. Clients put their
partition id in their metrics (``partition-id``), so the audit can compare
the excluded clients with the known malicious set.

``AGGREGATORS.build(name, n=clients_per_round, num_clients=N,
fraction_fit=..., malicious=ids, **params)`` makes one; bad parameters raise
:class:`~poisonlab.errors.ParameterError` naming the parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAvg, FedMedian,
                                     FedTrimmedAvg, MultiKrum)
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from poisonlab.errors import ParameterError
from poisonlab.federated.aggregation import coordinate_excluded, exclusion_metrics
from poisonlab.registry import Registry
from poisonlab.validate import check_beta, check_krum, check_range

MEDIAN_AUDIT_BETA = 0.25


class _NoEvaluateWarning(logging.Filter):
    """The server evaluates the global model itself, so Flower's warning about skipped client evaluation is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "fraction_evaluate is set to 0.0" not in record.getMessage()


logging.getLogger("flwr").addFilter(_NoEvaluateWarning())


def reply_arrays(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


def flatten(record: ArrayRecord) -> np.ndarray:
    """All arrays of a record as one float64 vector (in the record's key order)."""
    arrs = record.to_numpy_ndarrays()
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrs]) if arrs else np.zeros(0)


def partition_id(msg: Message) -> int:
    metrics = next(iter(msg.content.metric_records.values()))
    return int(metrics["partition-id"])


class AuditMixin:
    """Keeps ``self.audit[round] = {sampled, malicious, excluded, excl_precision, excl_recall, ...}``."""

    malicious: frozenset[int] = frozenset()

    def _init_audit(self, malicious: Iterable[int]) -> None:
        self.malicious = frozenset(int(i) for i in malicious)
        self.audit: dict[int, dict[str, Any]] = {}

    def _record(self, server_round: int, replies: list[Message], excluded: Iterable[bool],
                **extra: Any) -> None:
        pids = [partition_id(m) for m in replies]
        ex = np.asarray(list(excluded), dtype=bool)
        mal = np.array([p in self.malicious for p in pids], dtype=bool)
        self.audit[server_round] = {
            "sampled": sorted(pids),
            "malicious_sampled": sorted(p for p, m in zip(pids, mal) if m),
            "excluded": sorted(p for p, e in zip(pids, ex) if e),
            **exclusion_metrics(ex, mal), **extra,
        }

    def _valid(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Replies without error; the errors' reasons are kept in ``self.errors[round]``."""
        if not hasattr(self, "errors"):
            self.errors: dict[int, list[str]] = {}
        bad = [str(m.error.reason) for m in replies if m.has_error()]
        if bad:
            self.errors[server_round] = bad
        return [m for m in replies if not m.has_error()]


class AuditedFedAvg(AuditMixin, FedAvg):
    """FedAvg (weighted by local examples); excludes nobody."""

    def __init__(self, malicious: Iterable[int] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self._init_audit(malicious)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid(server_round, replies)
        self._record(server_round, valid, [False] * len(valid))
        return super().aggregate_train(server_round, replies)


class _CoordinateAudit(AuditMixin):
    audit_beta: float

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid(server_round, replies)
        if valid:  # before aggregation: FedTrimmedAvg pops the arrays out of the replies
            mat = np.stack([flatten(reply_arrays(m)) for m in valid])
            self._record(server_round, valid, coordinate_excluded(mat, self.audit_beta))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class AuditedFedMedian(_CoordinateAudit, FedMedian):
    """Coordinate-wise median (Yin et al. 2018). Audit: values outside the middle half."""

    audit_beta = MEDIAN_AUDIT_BETA

    def __init__(self, malicious: Iterable[int] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self._init_audit(malicious)


class AuditedFedTrimmedAvg(_CoordinateAudit, FedTrimmedAvg):
    """Coordinate-wise trimmed mean, ``beta`` cut from each side (Yin et al. 2018)."""

    def __init__(self, beta: float = 0.2, malicious: Iterable[int] = (), **kw: Any) -> None:
        super().__init__(beta=beta, **kw)
        self.audit_beta = beta
        self._init_audit(malicious)


class AuditedMultiKrum(AuditMixin, MultiKrum):
    """Krum / Multi-Krum (Blanchard et al. 2017) with Flower's selection; the unselected are excluded."""

    def __init__(self, malicious: Iterable[int] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self._init_audit(malicious)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._valid(server_round, replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        chosen = select_multikrum(contents, num_malicious_nodes=self.num_malicious_nodes,
                                  num_nodes_to_select=self.num_nodes_to_select)
        kept = {id(c) for c in chosen}
        self._record(server_round, valid, [id(c) not in kept for c in contents])
        return (aggregate_arrayrecords(chosen, self.weighted_by_key),
                self.train_metrics_aggr_fn(chosen, self.weighted_by_key))


class AuditedNormClipping(AuditMixin, DifferentialPrivacyServerSideFixedClipping):
    """Norm clipping of every update to ``clipping_norm``, FedAvg, then N(0, (noise_multiplier C / n)^2) noise.

    Sun et al. 2019 ("Can you really backdoor federated learning?"): clipping
    bounds what one boosted update can do; the small noise is their "weak
    differential privacy". Flower's server-side fixed-clipping DP wrapper does
    the work. Clients are not dropped, only shrunk: the audit counts a
    clipped client as excluded.
    """

    def __init__(self, strategy: FedAvg, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, malicious: Iterable[int] = ()) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._init_audit(malicious)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid(server_round, replies)
        if valid:
            g = flatten(self.current_arrays)
            norms = np.array([np.linalg.norm(flatten(reply_arrays(m)) - g) for m in valid])
            self._record(server_round, valid, norms > self.clipping_norm,
                         update_norms=[float(x) for x in norms])
        return super().aggregate_train(server_round, replies)


AGGREGATORS: Registry[Any] = Registry("aggregator")


def _base(n: int, num_clients: int, fraction_fit: float) -> dict[str, Any]:
    # no client-side evaluation: the server evaluates the global model on the test set
    return dict(fraction_train=fraction_fit, fraction_evaluate=0.0, min_train_nodes=n,
                min_available_nodes=num_clients)


@AGGREGATORS.register("fedavg")
def fedavg(*, n: int, num_clients: int, fraction_fit: float = 1.0, malicious: Iterable[int] = ()) -> AuditedFedAvg:
    """FedAvg (McMahan et al. 2017): mean of client models weighted by local examples."""
    return AuditedFedAvg(malicious=malicious, **_base(n, num_clients, fraction_fit))


@AGGREGATORS.register("median")
def median(*, n: int, num_clients: int, fraction_fit: float = 1.0, malicious: Iterable[int] = ()) -> AuditedFedMedian:
    """Coordinate-wise median (Yin et al. 2018), Flower's FedMedian."""
    return AuditedFedMedian(malicious=malicious, **_base(n, num_clients, fraction_fit))


@AGGREGATORS.register("trimmed_mean")
def trimmed_mean(beta: float = 0.2, *, n: int, num_clients: int, fraction_fit: float = 1.0,
                 malicious: Iterable[int] = ()) -> AuditedFedTrimmedAvg:
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg; ``beta`` in [0, 0.5) per side."""
    check_beta(beta)
    return AuditedFedTrimmedAvg(beta=float(beta), malicious=malicious, **_base(n, num_clients, fraction_fit))


@AGGREGATORS.register("krum")
def krum(f: int = 1, *, n: int, num_clients: int, fraction_fit: float = 1.0,
         malicious: Iterable[int] = ()) -> AuditedMultiKrum:
    """Krum (Blanchard et al. 2017): the one update closest to its n-f-2 neighbours; needs n >= 2f+3."""
    check_krum(n, f, 1, "krum")
    return AuditedMultiKrum(num_malicious_nodes=int(f), num_nodes_to_select=1, malicious=malicious,
                            **_base(n, num_clients, fraction_fit))


@AGGREGATORS.register("multikrum")
def multikrum(f: int = 1, m: int | None = None, *, n: int, num_clients: int, fraction_fit: float = 1.0,
              malicious: Iterable[int] = ()) -> AuditedMultiKrum:
    """Multi-Krum: the mean of the ``m`` best Krum scores (default ``m = n - f``); needs n >= 2f+3."""
    m = n - f if m is None and isinstance(f, int) else m
    check_krum(n, f, m, "multikrum")
    return AuditedMultiKrum(num_malicious_nodes=int(f), num_nodes_to_select=int(m), malicious=malicious,
                            **_base(n, num_clients, fraction_fit))


@AGGREGATORS.register("norm_clip")
def norm_clip(clip_norm: float = 1.0, noise_multiplier: float = 0.0, *, n: int, num_clients: int,
              fraction_fit: float = 1.0, malicious: Iterable[int] = ()) -> AuditedNormClipping:
    """Norm clipping of each update to ``clip_norm`` then FedAvg, plus optional Gaussian noise
    (std ``noise_multiplier * clip_norm / n``; Sun et al. 2019)."""
    check_range(clip_norm, "norm_clip: clip_norm", 0, 1e12, lo_open=True)
    check_range(noise_multiplier, "norm_clip: noise_multiplier", 0, 1e6)
    inner = AuditedFedAvg(**_base(n, num_clients, fraction_fit))
    return AuditedNormClipping(inner, float(noise_multiplier), float(clip_norm), n, malicious=malicious)


def build_aggregator(name: str, params: dict[str, Any], *, n: int, num_clients: int, fraction_fit: float = 1.0,
                     malicious: Iterable[int] = ()) -> Any:
    """Build aggregator ``name`` for ``n`` clients per round out of ``num_clients``."""
    if n < 1:
        raise ParameterError(f"fraction_fit={fraction_fit} samples no client per round")
    return AGGREGATORS.build(name, n=n, num_clients=num_clients, fraction_fit=fraction_fit, malicious=malicious,
                             **params)
