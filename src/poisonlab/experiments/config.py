"""Experiment config schema (TOML or YAML), validated with pydantic.

Example (TOML)::

    name = "quickstart"
    seeds = [0, 1, 2]              # several seeds: mean and std in the tables

    [dataset]
    name = "digits"

    [model]
    name = ["fastnet", "mnist_cnn"]   # any axis may be a list

    [training]
    epochs = 15
    lr = [0.05, 0.01]             # a list here is a grid over the recipe too

    [[attacks]]
    name = "badnets"
    rate = [0.05, 0.1]            # one run per value

    [[defenses]]
    name = "spectral_signatures"

A grid is the product ``datasets x models x training recipes x seeds``
(the *cells*); in every cell the runner trains a clean baseline, one
poisoned model per attack variant, and applies every defence to every
poisoned model. ``dataset``, ``model`` and ``training`` may be a table or an
array of tables; in ``dataset`` and ``training`` a list-valued key expands
into one variant per value, and in ``model`` so does ``name``. In attack and
defence entries a list-valued parameter expands the same way, unless the
method's own default for that parameter is a list (then only a list of lists
expands). Every variant is built (and so validated) when the config is
loaded; errors name the field.
"""

from __future__ import annotations

import itertools
import os
import reprlib
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
    loader: str | None = Field(None, description="your own loader, 'package.module:function': load(split) returns "
                                                 "an ImageSet, (images, labels) or a dataset of (image, label)")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("fastnet", description="a model of `poisonlab list`, a plug-in, or 'package.module:Class'")
    params: dict[str, Any] = Field(default_factory=dict)
    feature_layer: str | None = Field(None, description="the layer whose output is the penultimate features, for "
                                                        "a model without a features(x) method (e.g. 'fc1')")


class MethodConfig(BaseModel):
    """``name`` plus the method's own parameters (any other key)."""

    model_config = ConfigDict(extra="allow")

    name: str
    apply_to: list[str] | None = Field(
        None, min_length=1,
        description="defences only: the attacks (names or labels) this defence runs on; all when unset")
    retrain: bool = Field(True, description="filters only: False scores and flags (detection metrics) "
                                            "without retraining; the poisoned model is evaluated as is")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def key_params(self) -> dict[str, Any]:
        """The parameters that change a run's result: :attr:`params`, plus ``retrain`` when it is off."""
        return self.params | ({} if self.retrain else {"retrain": False})

    def applies_to(self, attack: "MethodConfig") -> bool:
        """Whether this defence entry runs on the poisoned model of ``attack``."""
        return self.apply_to is None or attack.name in self.apply_to or attack.label in self.apply_to

    @property
    def label(self) -> str:
        """A readable id: the name, plus parameters when given."""
        params = self.key_params
        if not params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def expand_table(table: dict[str, Any], keep_lists: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Cartesian product over the list-valued keys of ``table`` (in key order).

    ``{"a": [1, 2], "b": 3}`` -> ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``. Keys in
    ``keep_lists`` take a list as a value; for them only a list of lists expands.
    """
    axes = []
    for k, v in table.items():
        if isinstance(v, list) and (k not in keep_lists or (v and all(isinstance(x, list) for x in v))):
            if not v:
                raise ValueError(f"{k}: an empty list gives no variant")
            axes.append((k, v))
        else:
            axes.append((k, [v]))
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def _as_variants(v: Any, expand_keys: set[str] | None) -> Any:
    """A table or an array of tables -> a flat list of tables (list-valued keys expanded)."""
    tables = v if isinstance(v, list) else [v]
    out = []
    for t in tables:
        if not isinstance(t, dict):
            return v  # let pydantic report the type error
        if expand_keys is None:
            out.extend(expand_table(t))
        else:
            keep = frozenset(k for k in t if k not in expand_keys)
            out.extend(expand_table(t, keep))
    return out


class ExperimentConfig(BaseModel):
    """A whole grid. ``dataset``, ``model`` and ``training`` hold the expanded variants (at least one each)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="each in [0, 2**32 - 1] (numpy and torch seed generators take no more)")
    dataset: list[DatasetConfig] = Field(default_factory=lambda: [DatasetConfig()], min_length=1)
    model: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()], min_length=1)
    training: list[TrainConfig] = Field(default_factory=lambda: [TrainConfig()], min_length=1)
    attacks: list[MethodConfig] = Field(default_factory=list)
    defenses: list[MethodConfig] = Field(default_factory=list)
    baseline: bool = Field(True, description="also train on the clean set")
    clean_fraction: float = Field(0.05, gt=0, lt=0.5, description="trusted clean set for repair defences")
    plots: bool = True
    device: str = Field("auto", description="where models train: auto (CUDA when present, else the CPU), cpu, "
                                            "cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v[:40]!r}")
        if v.startswith("cuda"):
            import torch

            n = torch.cuda.device_count()
            index = int(v.split(":")[1]) if ":" in v else 0
            if index >= n:
                raise ValueError(f"{v!r} asked for, but this machine has {n} CUDA device(s); use auto or cpu")
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_scalar(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 0 <= s < 2**32]
        if bad:
            raise ValueError(f"every seed must be in [0, 4294967295], got {_short_repr(bad[0])}")
        return v

    @field_validator("dataset", "training", mode="before")
    @classmethod
    def _expand_tables(cls, v: Any) -> Any:
        try:
            return _as_variants(v, None)
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("model", mode="before")
    @classmethod
    def _expand_models(cls, v: Any) -> Any:
        return _as_variants(v, {"name"})

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        for m in v:
            check_model_name(m.name)
        return v

    @field_validator("attacks", "defenses", mode="before")
    @classmethod
    def _expand_methods(cls, methods: Any, info: ValidationInfo) -> Any:
        if not isinstance(methods, list):
            return methods
        from poisonlab.attacks import ATTACKS, get_attack
        from poisonlab.defenses import DEFENSES, get_defense

        registry, build = (ATTACKS, get_attack) if info.field_name == "attacks" else (DEFENSES, get_defense)
        out = []
        for i, m in enumerate(methods):
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or m["name"] not in registry:
                out.append(m)  # reported by the after-validator with its index
                continue
            defaults = registry.defaults(m["name"])
            keep = frozenset(k for k, d in defaults.items() if isinstance(d, (list, tuple))) | {"name", "apply_to"}
            try:
                variants = expand_table(m, keep)
                for v in variants:  # checked here so that the error names the entry as written
                    build(v["name"], **{k: x for k, x in v.items() if k not in ("name", "apply_to", "retrain")})
            except (ParameterError, ConfigError, TypeError, ValueError) as e:
                raise ValueError(f"[{i}] ({m['name']}): {e}") from None
            out.extend(variants)
        return out

    @field_validator("attacks", "defenses")
    @classmethod
    def _check_methods(cls, methods: list[MethodConfig], info: ValidationInfo) -> list[MethodConfig]:
        from poisonlab.attacks import ATTACKS, get_attack
        from poisonlab.defenses import DEFENSES, get_defense

        registry, build = (ATTACKS, get_attack) if info.field_name == "attacks" else (DEFENSES, get_defense)
        seen: set[str] = set()
        for i, m in enumerate(methods):
            try:
                registry.get(m.name)
            except ConfigError as e:
                raise ValueError(f"[{i}].name: {e}") from None
            try:
                built = build(m.name, **m.params)
            except (ParameterError, ConfigError, TypeError, ValueError) as e:
                raise ValueError(f"[{i}] ({m.name}): {e}") from None
            if not m.retrain and (info.field_name == "attacks" or getattr(built, "kind", None) != "filter"):
                raise ValueError(f"[{i}] ({m.name}): retrain = false is for filter defences only "
                                 f"(those of kind 'filter' in `poisonlab list`)")
            if m.label in seen and m.apply_to is None:
                raise ValueError(f"[{i}] ({m.name}): {m.label} is listed twice")
            seen.add(m.label)
            if m.apply_to is not None:
                if info.field_name == "attacks":
                    raise ValueError(f"[{i}] ({m.name}): apply_to is for defences only")
                attacks = info.data.get("attacks") or []
                known = {a.name for a in attacks} | {a.label for a in attacks}
                for a in m.apply_to:
                    if a not in known:
                        raise ValueError(f"[{i}] ({m.name}): apply_to names {a!r}, which is not an attack of this "
                                         f"config; attacks: {', '.join(sorted(known)) or '(none)'}")
        return methods


def check_model_name(name: str) -> None:
    """A ``ValueError`` (pydantic reports it with the field) unless ``name`` names a model poisonlab can build."""
    from poisonlab.models import MODELS

    try:
        MODELS.get(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def format_validation_error(source: str, e: ValidationError, data: dict[str, Any] | None = None) -> str:
    lines = []
    for err in e.errors(include_url=False):
        loc = list(err["loc"])
        # `[dataset]` given as one table is stored as a one-element list: name the field as the user wrote it
        if (len(loc) >= 2 and loc[0] in ("dataset", "model", "training") and isinstance(loc[1], int)
                and not isinstance((data or {}).get(loc[0]), list)):
            loc.pop(1)
        loc_s = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        sep = "" if msg.startswith("[") else ": "
        got = (f" (got {_short_repr(err['input'])})"
               if err["type"] not in ("extra_forbidden", "value_error") and not isinstance(err.get("input"), dict)
               else "")
        lines.append(_shorten(f"  {loc_s}{sep}{msg}{got}", MAX_ERROR_LINE_CHARS))
    if len(lines) > MAX_ERROR_LINES:
        lines[MAX_ERROR_LINES:] = [f"  ... and {len(lines) - MAX_ERROR_LINES} more"]
    return _shorten(f"{source}: invalid config\n" + "\n".join(lines), MAX_ERROR_CHARS)


def parse_config(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a config read from ``source``; an empty one is refused (it would silently run every default)."""
    if isinstance(data, dict) and not data:
        raise ConfigError(f"{source}: the config is empty; give at least a name and a [dataset] (see "
                          "examples/quickstart.toml)")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e, data)) from None


# Limits on what a config file may make us do. Config files are small hand-written tables: these only bite on
# files built to exhaust memory or time (an alias bomb, a nesting bomb, a value of megabytes).
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_ERROR_LINES = 20
MAX_ERROR_LINE_CHARS = 300
MAX_ERROR_CHARS = 4000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 6
_REPR.maxlevel = 3


def _short_repr(value: Any) -> str:
    """repr() cut to a few elements and characters, without building the full repr of a huge value first."""
    return _REPR.repr(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 25] + f" ... ({len(text) - limit + 25} more characters)"


class _Refused(Exception):
    """A YAML construct :class:`_StrictYamlLoader` does not build, with where it is."""

    def __init__(self, what: str, mark: Any):
        super().__init__(f"{what} (line {mark.line + 1}, column {mark.column + 1})")


class _StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and with bounded nesting.

    An alias (``*name``) repeats an anchored node; nine nested levels of ten aliases each expand to 10^9
    values once anything walks the data (validation, error messages), from a file of a few lines. A config
    never needs one, so they are refused where they appear rather than expanded or capped afterwards.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML alias *{event.anchor} is not allowed in a config; write the value out",
                           event.start_mark)
        if self._depth >= MAX_NESTING:
            raise _Refused(f"values nested more than {MAX_NESTING} levels deep", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_deep(data: dict[str, Any]) -> str | None:
    """The top-level key under which values nest more than :data:`MAX_NESTING` levels, else None (no recursion)."""
    todo = [(v, 1, k) for k, v in data.items()]
    while todo:
        v, depth, key = todo.pop()
        if isinstance(v, (list, dict)):
            if depth >= MAX_NESTING:
                return str(key)
            todo.extend((x, depth + 1, key) for x in (v.values() if isinstance(v, dict) else v))
    return None


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}, offset {e.start}); "
                          "save the config as UTF-8") from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML or YAML file into a dict; anything else is one :class:`ConfigError` naming the file.

    Refused, each with a sentence saying where: a missing or non-regular file, more than
    :data:`MAX_CONFIG_BYTES` bytes, text that is not UTF-8, a syntax error, YAML aliases, values nested more
    than :data:`MAX_NESTING` levels, and a top level that is not a table.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; a config is a .toml, .yaml or .yml file")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES} bytes; a config is at most {MAX_CONFIG_BYTES} "
                          "bytes")
    text = _decode(path, raw)
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_shorten(f"{path}: cannot parse TOML: {e}", MAX_ERROR_LINE_CHARS)) from None
    except _Refused as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise ConfigError(_shorten(f"{path}: cannot parse YAML: {what}{where}", MAX_ERROR_LINE_CHARS)) from None
    except yaml.YAMLError as e:
        raise ConfigError(_shorten(f"{path}: cannot parse YAML: {e}", MAX_ERROR_LINE_CHARS)) from None
    except RecursionError:  # tomllib descends once per nesting level
        raise ConfigError(f"{path}: values nested more than {MAX_NESTING} levels deep") from None
    if data is None or data == {}:
        raise ConfigError(f"{path}: the config is empty; give at least a name and a [dataset] (see "
                          "examples/quickstart.toml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/mapping")
    deep = _too_deep(data)
    if deep is not None:
        raise ConfigError(f"{path}: field {_short_repr(deep)} nests values more than {MAX_NESTING} levels deep")
    return data


def load_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate a TOML or YAML experiment config; errors name the file and the field."""
    return parse_config(read_config_file(path), str(path))


def with_device(cfg: ExperimentConfig, device: str) -> ExperimentConfig:
    """``cfg`` with its ``device`` replaced (the CLI's ``--device``); a bad value is a ConfigError naming it."""
    try:
        return ExperimentConfig.model_validate(cfg.model_dump() | {"device": device})
    except ValidationError as e:
        raise ConfigError(format_validation_error("--device", e)) from None
