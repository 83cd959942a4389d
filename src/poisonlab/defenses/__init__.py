"""Defences, registered in :data:`DEFENSES`; see :mod:`poisonlab.defenses.base` for the interface."""

from __future__ import annotations

from typing import Any

from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, Filter, FilterOutput
from poisonlab.plugins import import_submodules as _import_submodules
import sys as _sys

# every module in this package (and sub-packages such as filters/) registers its defences on import
_import_submodules(_sys.modules[__name__])


def get_defense(name: str, **params: Any) -> Defense:
    """Build the defence ``name`` (registered, a plug-in, or an import path) with ``params`` (validated)."""
    return DEFENSES.create(name, Defense, **params)


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseResult", "Filter", "FilterOutput", "get_defense"]
