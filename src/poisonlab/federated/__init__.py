"""Federated-learning poisoning on Flower's simulation engine.

Clients hold IID or Dirichlet non-IID partitions; a fraction of them is
malicious (poisoned data, model replacement, Byzantine updates, Sybils); the
server aggregates with FedAvg or a robust rule, all as Flower strategies.
See ``docs/federated.md``.

- :mod:`~poisonlab.federated.partition`    IID / Dirichlet splits over labels
- :mod:`~poisonlab.federated.aggregation`  aggregation rules and audits over plain arrays
- :mod:`~poisonlab.federated.malicious`    what a malicious client does to its update
- :mod:`~poisonlab.federated.strategies`   audited Flower strategies, ``AGGREGATORS``
- :mod:`~poisonlab.federated.client`       the Flower ClientApp
- :mod:`~poisonlab.federated.simulation`   :func:`run_federated`

Flower is imported lazily by the modules that need it, so ``partition``,
``aggregation`` and ``malicious`` work without it.
"""

from poisonlab.federated.aggregation import (clip_updates, coordinate_median, exclusion_metrics, fedavg,
                                             krum_scores, krum_select, trimmed_mean)
from poisonlab.federated.malicious import MODES, transform_update
from poisonlab.federated.partition import dirichlet_partition, iid_partition, label_skew, partition

__all__ = ["iid_partition", "dirichlet_partition", "partition", "label_skew", "fedavg", "coordinate_median",
           "trimmed_mean", "krum_scores", "krum_select", "clip_updates", "exclusion_metrics", "MODES",
           "transform_update", "load_federated_config", "run_federated"]


def __getattr__(name: str):
    if name == "run_federated":
        from poisonlab.federated.simulation import run_federated
        return run_federated
    if name in ("load_federated_config", "FederatedConfig", "parse_federated_config"):
        from poisonlab.federated import config
        return getattr(config, name)
    raise AttributeError(name)
