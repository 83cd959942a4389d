"""Attacks: one module per family, each class registered in :data:`ATTACKS`.

``get_attack(name, **params)`` builds one; ``attack.poison(train, seed)``
returns ``(poisoned_set, Poisoning)``.
"""

from __future__ import annotations

from typing import Any

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger, n_poison
from poisonlab.attacks.badnets import BadNets, PatchTrigger
from poisonlab.attacks.label_flip import RandomLabelFlip
from poisonlab.plugins import import_submodules as _import_submodules
import sys as _sys

# every module in this package registers its attacks on import
_import_submodules(_sys.modules[__name__])


def get_attack(name: str, **params: Any) -> Attack:
    """Build the attack ``name`` (registered, a plug-in, or an import path) with ``params`` (validated)."""
    return ATTACKS.create(name, Attack, **params)


__all__ = ["ATTACKS", "Attack", "AttackContext", "Poisoning", "Trigger", "get_attack", "n_poison", "BadNets",
           "PatchTrigger", "RandomLabelFlip"]
