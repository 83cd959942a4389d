"""The Flower ClientApp: local training on a client's partition, honest or malicious.

Flower ships the ClientApp to its Ray actors with every message, so it
carries only a small :class:`ClientSpec`; each actor process loads the
dataset once (the same stratified slice the server uses) and recomputes the
partition and the malicious set from the seed, which the server sends in
the round's config together with the run index.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from poisonlab.attacks import AttackContext, get_attack
from poisonlab.data import ImageSet, Splits, load_data
from poisonlab.experiments.config import DatasetConfig
from poisonlab.federated.malicious import DATA_MODES, NO_TRAINING, transform_update
from poisonlab.federated.partition import partition
from poisonlab.models import build_model_for
from poisonlab.training.loop import TrainConfig, fit
from poisonlab.utils import seed_everything

NORMALISATION = ("mean", "std")
"""Model buffers fixed at build time from the training slice: never exchanged."""


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client process needs besides the message (small, picklable)."""

    dataset: dict[str, Any]
    data_dir: str | None
    model: str
    model_params: dict[str, Any]
    training: dict[str, Any]
    num_clients: int
    partition: str
    alpha: float
    clients_per_round: int
    num_malicious: int = 0
    mode: str = "none"
    attack: tuple[str, dict[str, Any]] | None = None
    boost: float | None = None
    eta: float = 1.0
    scale: float = 1.0
    sigma: float = 1.0
    value: float = 100.0
    start_round: int = 1
    threads: int = 1
    sybil_dir: str | None = None
    feature_layer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def effective_boost(self) -> float:
        if self.boost is not None:
            return float(self.boost)
        if self.mode == "model_replacement":  # Bagdasaryan et al.: gamma = n / eta
            return self.clients_per_round / self.eta
        return 1.0


def malicious_ids(num_clients: int, num_malicious: int, seed: int) -> list[int]:
    """Which clients are malicious for ``seed`` (a random subset, the same on server and clients)."""
    rng = np.random.default_rng([seed, 7919])
    return sorted(int(i) for i in rng.choice(num_clients, size=num_malicious, replace=False))


def load_federated_data(dataset: dict[str, Any] | DatasetConfig, data_dir: str | None) -> Splits:
    """The configured train/test slices, taken exactly as a centralised run takes them."""
    d = dataset if isinstance(dataset, DatasetConfig) else DatasetConfig.model_validate(dataset)
    return load_data(**(d.model_dump() | {"data_dir": data_dir or d.data_dir}))


def new_model(spec: ClientSpec, train: ImageSet) -> torch.nn.Module:
    return build_model_for(spec.model, train, feature_layer=spec.feature_layer, **spec.model_params)


def exchanged_keys(model: torch.nn.Module) -> list[str]:
    """State entries sent between server and clients: float parameters and batch-norm statistics."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and k not in NORMALISATION]


def model_arrays(model: torch.nn.Module, keys: list[str]) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {k: sd[k].detach().cpu().numpy().copy() for k in keys}


def load_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"unexpected model arrays: {unexpected[:5]}")


def server_data_init(model: torch.nn.Module, train: ImageSet, seed: int) -> None:
    """Data-dependent initialisation (FastNet's whitened stem) of the *global* model, once, on the server.

    In this simulation the server uses a sample of the pooled training slice
    (in a deployment it would be a public sample). Clients never re-initialise:
    see :func:`keep_global_init`.
    """
    if getattr(model, "needs_data_init", False):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:5000].numpy()
        model.data_init(train.subset(np.sort(idx)).float_tensor())


def keep_global_init(model: torch.nn.Module) -> None:
    """Mark a model loaded with global weights as initialised, so ``fit`` keeps the global stem."""
    flag = getattr(model, "data_initialised", None)
    if isinstance(flag, torch.Tensor):
        flag.fill_(True)


def make_attack(spec: ClientSpec):
    if spec.attack is None:
        return None
    name, params = spec.attack
    return get_attack(name, **params)


# ------------------------------------------------------- per-process cache
_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def client_data(spec: ClientSpec) -> Splits:
    return _cached(("data", spec.key()), lambda: load_federated_data(spec.dataset, spec.data_dir))


def client_partitions(spec: ClientSpec, seed: int) -> list[np.ndarray]:
    return _cached(("parts", spec.key(), seed), lambda: partition(
        client_data(spec).train.labels, spec.num_clients, spec.partition, spec.alpha, seed))


def _train_fn(spec: ClientSpec, train: ImageSet, seed: int):
    """A surrogate trainer for attacks that need a clean model (trained on the client's own data only)."""
    def train_model(s: ImageSet, **_: Any) -> torch.nn.Module:
        seed_everything(seed)
        m = new_model(spec, train)
        fit(m, s, TrainConfig(**spec.training), seed=seed)
        return m
    return train_model


def poisoned_set(spec: ClientSpec, seed: int, pids: tuple[int, ...]):
    """The union of partitions ``pids`` poisoned by the spec's attack: (poisoned ImageSet, Poisoning)."""
    def make():
        data = client_data(spec)
        parts = client_partitions(spec, seed)
        clean = data.train.subset(np.concatenate([parts[p] for p in pids]))
        attack = make_attack(spec)
        ctx = AttackContext(test=data.test, train_fn=_train_fn(spec, clean, seed))
        return attack.poison(clean, seed=seed * 1000 + pids[0], context=ctx)
    return _cached(("poison", spec.key(), seed, pids), make)


def _train_update(spec: ClientSpec, train: ImageSet, global_state: dict[str, np.ndarray], fit_seed: int
                  ) -> dict[str, np.ndarray]:
    seed_everything(fit_seed)
    model = new_model(spec, client_data(spec).train)
    load_arrays(model, global_state)
    keep_global_init(model)
    fit(model, train, TrainConfig(**spec.training), seed=fit_seed)
    local = model_arrays(model, list(global_state))
    return {k: local[k] - global_state[k] for k in global_state}


def _sybil_update(spec: ClientSpec, seed: int, rnd: int, run: int, global_state: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """One poisoned update shared by every Sybil: trained once per round on the union of their data.

    The first Sybil of the round computes it under a file lock and the others
    read it, so all send exactly the same update (one machine; on several
    machines each recomputes the same seeded update).
    """
    mal = tuple(malicious_ids(spec.num_clients, spec.num_malicious, seed))

    def compute() -> dict[str, np.ndarray]:
        poisoned, _ = poisoned_set(spec, seed, mal)
        return _train_update(spec, poisoned, global_state, fit_seed=(seed * 1_000_003 + run * 10_007 + rnd * 1009 + 999_983) % 2**31)

    if not spec.sybil_dir:
        return compute()
    d = Path(spec.sybil_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"run{run}_round{rnd}.npz"
    with open(d / f"run{run}_round{rnd}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in global_state}
            upd = compute()
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **upd)
            tmp.replace(path)
            return upd
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def local_update(spec: ClientSpec, pid: int, rnd: int, seed: int, run: int,
                 global_state: dict[str, np.ndarray], honest: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
    """What client ``pid`` sends back in round ``rnd``: (model arrays, metrics); ``honest``: nobody attacks."""
    import time

    torch.set_num_threads(max(1, spec.threads))
    t0 = time.perf_counter()
    parts = client_partitions(spec, seed)
    mal = (not honest and spec.mode != "none" and rnd >= spec.start_round
           and pid in malicious_ids(spec.num_clients, spec.num_malicious, seed))
    fit_seed = (seed * 1_000_003 + run * 10_007 + rnd * 1009 + pid) % 2**31
    mode = spec.mode if mal else "none"
    if mode == "sybil":
        upd = _sybil_update(spec, seed, rnd, run, global_state)
    elif mode in NO_TRAINING:
        upd = {k: np.zeros_like(v) for k, v in global_state.items()}
    else:
        train = (poisoned_set(spec, seed, (pid,))[0] if mode in DATA_MODES
                 else client_data(spec).train.subset(parts[pid]))
        upd = _train_update(spec, train, global_state, fit_seed)
    if mal:
        params = {n for n, _ in new_model(spec, client_data(spec).train).named_parameters()}
        upd = transform_update(upd, mode, params, rng=np.random.default_rng(fit_seed), boost=spec.effective_boost,
                               scale=spec.scale, sigma=spec.sigma, value=spec.value)
    out = {k: (global_state[k] + upd[k]).astype(global_state[k].dtype) for k in global_state}
    metrics = {"num-examples": int(len(parts[pid])), "partition-id": int(pid), "malicious": int(mal),
               "client-seconds": time.perf_counter() - t0}
    return out, metrics


def make_client_app(spec: ClientSpec) -> ClientApp:
    """A Flower ClientApp whose ``train`` handler runs :func:`local_update`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        arrays = msg.content["arrays"]
        keys = list(arrays.keys())
        state = dict(zip(keys, arrays.to_numpy_ndarrays()))
        new, metrics = local_update(spec, int(context.node_config["partition-id"]), int(cfg["server-round"]),
                                    int(cfg["seed"]), int(cfg["run"]), state, honest=bool(cfg.get("honest", 0)))
        record = ArrayRecord({k: Array(np.ascontiguousarray(new[k])) for k in keys})
        return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
