"""Import every module of a package so that its ``@REGISTRY.register`` decorators run.

This is what makes a new attack or defence "one file plus a registry entry":
dropping ``attacks/my_attack.py`` with a registered class is enough.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_submodules(package: ModuleType) -> None:
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(info.name)
