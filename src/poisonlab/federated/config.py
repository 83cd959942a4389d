"""Federated experiment config (TOML or YAML), validated with pydantic.

Example::

    name = "fl-mnist"
    seeds = [0]
    [dataset]            # as in centralised configs
    name = "mnist"
    train_size = 1000
    [model]
    name = "mnist_cnn"
    [training]           # each client's local training (epochs = local epochs per round)
    epochs = 1
    schedule = "none"
    [federation]
    num_clients = 10
    rounds = 3
    partition = "iid"    # or "dirichlet" with alpha
    [malicious]
    fraction = 0.1       # or count = 1
    mode = "constant"    # none | data | model_replacement | sign_flip | gaussian | constant | sybil
    [malicious.attack]   # a catalogue attack for data / model_replacement / sybil
    name = "badnets"
    rate = 0.5
    [[aggregators]]
    name = "fedavg"
    [[aggregators]]
    name = "krum"
    f = 1

With ``baseline = true`` (the default) FedAvg is also run with every client
honest, the reference the attacked runs are compared with.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from poisonlab.errors import ConfigError, ParameterError
from poisonlab.experiments.config import (DatasetConfig, MethodConfig, ModelConfig, check_model_name,
                                          format_validation_error, read_config_file)
from poisonlab.federated.malicious import DATA_MODES, MODES
from poisonlab.training.loop import TrainConfig


class FederationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_clients: int = Field(10, ge=2, le=10_000)
    rounds: int = Field(10, ge=1, le=100_000)
    fraction_fit: float = Field(1.0, gt=0, le=1, description="share of clients sampled per round")
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition = 'dirichlet')")

    @property
    def clients_per_round(self) -> int:
        # Flower samples max(int(N * fraction), min_train_nodes); we set min_train_nodes to this
        return max(2, int(self.num_clients * self.fraction_fit))


class MaliciousConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.0, allow_inf_nan=False,
                            description="share of the clients that are malicious, [0, 1]")
    count: int | None = Field(None, description="number of malicious clients (overrides fraction)")
    mode: Literal[MODES] = "none"  # type: ignore[valid-type]
    attack: MethodConfig | None = Field(None, description="catalogue attack on the malicious clients' data")
    boost: float | None = Field(None, gt=0, description="update scale; model_replacement default n/eta, sybil 1")
    eta: float = Field(1.0, gt=0, description="server learning rate assumed by model replacement's n/eta")
    scale: float = Field(1.0, gt=0, description="sign_flip: sent update = -scale * update")
    sigma: float = Field(1.0, gt=0, description="gaussian: std of the random update")
    value: float = Field(100.0, allow_inf_nan=False, description="constant: every coordinate of the update")
    start_round: int = Field(1, ge=1, description="malicious clients act honestly before this round")

    @field_validator("attack")
    @classmethod
    def _check_attack(cls, m: MethodConfig | None) -> MethodConfig | None:
        if m is None:
            return m
        from poisonlab.attacks import ATTACKS, get_attack

        try:
            ATTACKS.get(m.name)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        try:
            get_attack(m.name, **m.params)
        except (ParameterError, ConfigError, TypeError, ValueError) as e:
            raise ValueError(f"({m.name}): {e}") from None
        return m

    @model_validator(mode="after")
    def _needs_attack(self) -> "MaliciousConfig":
        if self.mode in DATA_MODES and self.attack is None:
            raise ValueError(f"mode {self.mode!r} poisons the malicious clients' data: add [malicious.attack]")
        return self


class SimulationConfig(BaseModel):
    """Flower simulation engine (Ray) resources."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use (default: all)")
    client_num_cpus: float = Field(1.0, gt=0, description="CPUs per client actor (parallel clients = num_cpus / this)")
    client_num_gpus: float = Field(0.0, ge=0)
    ray_init_args: dict[str, Any] = Field(default_factory=dict)


class FederatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "federated"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, schedule="none"))
    federation: FederationConfig = Field(default_factory=FederationConfig)
    malicious: MaliciousConfig = Field(default_factory=MaliciousConfig)
    aggregators: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig(name="fedavg")], min_length=1)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    baseline: bool = Field(True, description="also run FedAvg with every client honest (attack 'none')")
    plots: bool = True

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: ModelConfig) -> ModelConfig:
        check_model_name(v.name)
        return v

    @property
    def num_malicious(self) -> int:
        m = self.malicious
        return int(m.count) if m.count is not None else int(math.floor(m.fraction * self.federation.num_clients + 0.5))

    def check(self) -> None:
        """Cross-field checks; errors name the parameter (:class:`ParameterError`)."""
        from poisonlab.federated.strategies import build_aggregator

        n_clients = self.federation.num_clients
        m = self.malicious
        if m.fraction > 1:
            raise ParameterError(f"malicious.fraction={m.fraction} gives {self.num_malicious} malicious clients, "
                                 f"more than the {n_clients} clients (allowed [0, 1])")
        if m.fraction < 0:
            raise ParameterError(f"malicious.fraction must be in [0, 1], got {m.fraction}")
        if m.count is not None and not 0 <= m.count <= n_clients:
            raise ParameterError(f"malicious.count={m.count}: more malicious clients than the "
                                 f"{n_clients} clients (allowed 0..{n_clients})")
        if m.mode != "none" and self.num_malicious == 0:
            raise ParameterError(f"malicious.mode={m.mode!r} but malicious.fraction={m.fraction} gives no "
                                 f"malicious client among {n_clients}")
        n = self.federation.clients_per_round
        for i, a in enumerate(self.aggregators):
            try:
                build_aggregator(a.name, a.params, n=n, num_clients=n_clients,
                                 fraction_fit=self.federation.fraction_fit)
            except (ParameterError, ConfigError, TypeError) as e:
                raise ParameterError(f"aggregators[{i}] ({a.name}): {e}") from None


def parse_federated_config(data: dict[str, Any], source: str = "<config>") -> FederatedConfig:
    try:
        cfg = FederatedConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
    cfg.check()
    return cfg


def load_federated_config(path: str | os.PathLike[str]) -> FederatedConfig:
    """Read and validate a TOML or YAML federated config; errors name the file and the field."""
    data = read_config_file(path)
    try:
        return parse_federated_config(data, str(path))
    except ParameterError as e:
        raise ParameterError(f"{path}: {e}") from None
