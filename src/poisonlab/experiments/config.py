"""Experiment config schema (TOML or YAML), validated with pydantic.

Example (TOML)::

    name = "quickstart"
    seeds = [0]

    [dataset]
    name = "digits"

    [model]
    name = "fastnet"

    [training]
    epochs = 15
    batch_size = 64

    [[attacks]]
    name = "random_flip"
    rate = 0.2

    [[defenses]]
    name = "spectral_signatures"

Every attack and defence entry is ``name`` plus that method's parameters;
they are built (and so validated) when the config is loaded.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from poisonlab.errors import ConfigError, ParameterError
from poisonlab.training.loop import TrainConfig


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "digits"
    train_size: int | None = Field(None, ge=10, description="stratified subset of the training split")
    test_size: int | None = Field(None, ge=10, description="stratified subset of the test split")
    data_dir: str | None = None
    path: str | None = Field(None, description="image folder, for name = 'folder'")
    image_size: int = Field(32, ge=4, le=512)
    download: bool = False


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "fastnet"
    params: dict[str, Any] = Field(default_factory=dict)


class MethodConfig(BaseModel):
    """``name`` plus the method's own parameters (any other key)."""

    model_config = ConfigDict(extra="allow")

    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        """A readable id: the name, plus parameters when given."""
        if not self.params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainConfig = Field(default_factory=TrainConfig)
    attacks: list[MethodConfig] = Field(default_factory=list)
    defenses: list[MethodConfig] = Field(default_factory=list)
    baseline: bool = Field(True, description="also train on the clean set")
    clean_fraction: float = Field(0.05, gt=0, lt=0.5, description="trusted clean set for repair defences")
    plots: bool = True

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: ModelConfig) -> ModelConfig:
        from poisonlab.models import MODELS

        if v.name not in MODELS:
            raise ValueError(f"unknown model {v.name!r}; known: {', '.join(MODELS.names())}")
        return v

    @field_validator("attacks", "defenses")
    @classmethod
    def _check_methods(cls, methods: list[MethodConfig], info: ValidationInfo) -> list[MethodConfig]:
        from poisonlab.attacks import ATTACKS, get_attack
        from poisonlab.defenses import DEFENSES, get_defense

        registry, build = (ATTACKS, get_attack) if info.field_name == "attacks" else (DEFENSES, get_defense)
        for i, m in enumerate(methods):
            if m.name not in registry:
                raise ValueError(f"[{i}].name: unknown {registry.kind} {m.name!r}; known: {', '.join(registry.names())}")
            try:
                build(m.name, **m.params)
            except (ParameterError, ConfigError, TypeError, ValueError) as e:
                raise ValueError(f"[{i}] ({m.name}): {e}") from None
        return methods


def _format_validation_error(source: str, e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        sep = "" if msg.startswith("[") else ": "
        lines.append(f"  {loc}{sep}{msg}" + (f" (got {err['input']!r})" if err["type"] not in ("extra_forbidden", "value_error") and not isinstance(err.get("input"), dict) else ""))
    return f"{source}: invalid config\n" + "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def load_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate a TOML or YAML experiment config; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    return parse_config(data, str(path))
