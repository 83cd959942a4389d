"""What a malicious client does to its model update (plain arrays).

A client receives the global model ``G``, trains a local model ``L`` and
sends a model back. An honest client sends ``L``; a malicious one sends
``G + t(L - G)`` for one of these transforms ``t`` of the update:

- ``data``: no transform; the harm is in the poisoned local data.
- ``model_replacement`` (Bagdasaryan et al. 2020, "How to backdoor federated
  learning"): the backdoored update times ``boost`` (default ``n / eta``: the
  number of clients per round over the server learning rate, 1 for FedAvg),
  so that after averaging the global model is replaced by the attacker's.
- ``sign_flip``: ``-scale * (L - G)`` (Byzantine, e.g. Damaskinos et al. 2018).
- ``gaussian``: ``N(0, sigma^2)`` per coordinate, ignoring the local model.
- ``constant``: every coordinate of the update set to ``value``.
- ``sybil``: all malicious clients send the same poisoned update, trained
  on the union of their partitions (the colluding fake clients of Fung et
  al. 2018, "Mitigating Sybils in federated learning poisoning"), times ``boost``.

Only trainable parameters are transformed; batch-norm statistics and the
normalisation constants are sent as trained, so the measured harm is that of
poisoned weights rather than of a negative variance.
"""

from __future__ import annotations

import numpy as np

MODES = ("none", "data", "model_replacement", "sign_flip", "gaussian", "constant", "sybil")
DATA_MODES = ("data", "model_replacement", "sybil")
"""Modes that train on a partition poisoned by a catalogue attack."""
NO_TRAINING = ("gaussian", "constant")
"""Modes whose update ignores the local model, so the client does not train."""


def transform_update(update: dict[str, np.ndarray], mode: str, keys: set[str] | list[str], *,
                     rng: np.random.Generator | None = None, boost: float = 1.0, scale: float = 1.0,
                     sigma: float = 1.0, value: float = 100.0) -> dict[str, np.ndarray]:
    """Return the update a malicious client sends instead of ``update`` (name -> array).

    Arrays whose name is not in ``keys`` (buffers) are returned unchanged.
    """
    rng = rng or np.random.default_rng(0)
    out = {}
    for k, u in update.items():
        if k not in keys:
            out[k] = u
        elif mode in ("data", "none"):
            out[k] = u
        elif mode in ("model_replacement", "sybil"):
            out[k] = (u * boost).astype(u.dtype)
        elif mode == "sign_flip":
            out[k] = (-scale * u).astype(u.dtype)
        elif mode == "gaussian":
            out[k] = rng.normal(0.0, sigma, size=u.shape).astype(u.dtype)
        elif mode == "constant":
            out[k] = np.full_like(u, value)
        else:
            raise ValueError(f"unknown malicious mode {mode!r}")
    return out
