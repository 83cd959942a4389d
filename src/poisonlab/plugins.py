"""Finding code outside the catalogue: package sub-modules, import paths and entry points.

Three ways a method, model or dataset reaches poisonlab:

- a module inside ``poisonlab.attacks`` / ``poisonlab.defenses``: :func:`import_submodules`
  imports every one of them so that their ``@REGISTRY.register`` decorators run (a new
  attack is one file);
- an import path written in a config, ``"mypkg.nets:MyNet"``: :func:`load_object`;
- an entry point of an installed package, in the groups of :data:`ENTRY_POINT_GROUPS`::

      # the plug-in's pyproject.toml
      [project.entry-points."poisonlab.attacks"]
      my_attack = "mypkg.attacks:MyAttack"

  :func:`entry_points` lists them; registries load them when a name is not built in.

Importing a module runs its code: an import path or an installed plug-in is trusted exactly
as far as any Python package you install.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from poisonlab.errors import ConfigError

ENTRY_POINT_GROUPS = {"attack": "poisonlab.attacks", "defense": "poisonlab.defenses",
                      "model": "poisonlab.models", "dataset": "poisonlab.datasets"}


def import_submodules(package: ModuleType) -> None:
    """Import every module of ``package`` (recursively) except those whose name starts with ``_``."""
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(info.name)


def is_import_path(name: str) -> bool:
    """Whether ``name`` is written as an import path ``"package.module:attribute"``."""
    return isinstance(name, str) and ":" in name


def load_object(path: str, kind: str = "object") -> Any:
    """The object an import path ``"package.module:attribute"`` names (``attribute`` may be dotted).

    Raises:
        ConfigError: one sentence naming ``kind``, the path and what went wrong (no such module,
            an error while importing it, no such attribute).
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{kind} {path!r}: an import path is written 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{kind} {path!r}: cannot import module {module_name!r} ({e}); is it installed or "
                          f"on PYTHONPATH?") from None
    except Exception as e:  # noqa: BLE001 - the plug-in's own import failed: say so in one sentence
        raise ConfigError(f"{kind} {path!r}: importing {module_name!r} failed ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def entry_points(kind: str) -> dict[str, Any]:
    """The installed entry points of ``kind`` (``attack``, ``defense``, ``model``, ``dataset``) by name."""
    from importlib.metadata import entry_points as _installed

    return {ep.name: ep for ep in _installed(group=ENTRY_POINT_GROUPS[kind])}


def load_entry_point(kind: str, ep: Any) -> Any:
    """Load one entry point; a failure is a :class:`ConfigError` naming the plug-in."""
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{kind} {ep.name!r} (entry point {ep.value!r} in group "
                          f"{ENTRY_POINT_GROUPS[kind]!r}) failed to load: {type(e).__name__}: {e}") from None
