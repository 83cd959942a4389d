"""The plug-in contract, checked: what every attack and defence must do for configs, the cache and
the runner to treat it correctly (in the spirit of scikit-learn's ``check_estimator``).

The rules the catalogue rests on, which nothing else checks:

- every constructor parameter has a default, so ``get_attack(name)`` builds one;
- every constructor parameter is stored under its own name, so :meth:`params` reports it: a
  parameter ``params()`` drops is missing from the cache key, and a changed value would reuse
  a stale poisoned set;
- ``params()`` round-trips: building again from it gives the same parameters;
- an attack's test-time trigger is a dataclass the cache can store and rebuild (otherwise the
  poisoned set is never cached and is recomputed on every run);
- ``poison()`` changes exactly the training images and labels it records in ``indices``
  (detection metrics, stealth figures and the trusted clean set are computed from them).

``tests/test_contract.py`` runs :func:`check_attack` and :func:`check_defense` over every registered
entry, plug-ins included; a plug-in author can call them in the plug-in's own tests::

    from poisonlab.contract import check_attack
    check_attack("my_attack", train, test, clean_model)
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

import numpy as np

# budget parameters lowered for the poison() check: the contract is about bookkeeping, not about
# how strong the attack is, so iterative attacks run a few steps instead of hundreds
QUICK_PARAMS = {"steps": 3, "restarts": 1, "max_rounds": 2, "train_steps": 2, "noise_steps": 2, "epochs": 1,
                "surrogate_epochs": 1, "pgd_steps": 2, "iterations": 3, "n_poisons": 3, "generator_epochs": 1,
                "mask_steps": 2}


class ContractError(AssertionError):
    """An attack or defence breaks the plug-in contract; the message says which rule and how to fix it."""


def constructor_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The named parameters of a registered class (its ``__init__``) or factory function (a preset);
    ``self``, ``*args`` and ``**kwargs`` left out."""
    sig = inspect.signature(factory)
    return {k: p for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_parameters(kind: str, name: str, build: Callable[..., Any], factory: Callable[..., Any]) -> Any:
    """Builds with defaults; ``params()`` covers the signature and round-trips. Returns the default object."""
    from poisonlab.experiments.cache import jsonable

    params = constructor_parameters(factory)
    required = [k for k, p in params.items() if p.default is inspect.Parameter.empty]
    if required:
        raise ContractError(f"{kind} {name!r}: parameter(s) {', '.join(required)} have no default; every "
                            f"parameter needs one so that a config may name the {kind} alone")
    obj = build(name)
    reported = obj.params()
    missing = sorted(set(params) - set(reported))
    if missing:
        raise ContractError(f"{kind} {name!r}: __init__ takes {', '.join(missing)} but params() does not report "
                            f"them; store each parameter as self.<name> (else the cache key ignores it)")
    extra = sorted(set(reported) - set(params))
    if extra:
        raise ContractError(f"{kind} {name!r}: params() reports {', '.join(extra)}, not parameters of __init__")
    again = build(name, **reported).params()
    if jsonable(again) != jsonable(reported):
        raise ContractError(f"{kind} {name!r}: building from params() changes them: {jsonable(reported)} -> "
                            f"{jsonable(again)}")
    return obj


def check_defense(name: str) -> None:
    """The contract of the defence registered as ``name`` (see the module docstring)."""
    from poisonlab.defenses import DEFENSES, get_defense

    d = check_parameters("defense", name, get_defense, DEFENSES.get(name))
    if d.kind not in ("filter", "training", "repair", "detection"):
        raise ContractError(f"defense {name!r}: kind must be filter, training, repair or detection, got {d.kind!r}")
    if not isinstance(d.retrains, bool):
        raise ContractError(f"defense {name!r}: retrains must be a bool, got {d.retrains!r}")


def check_attack(name: str, train: Any, test: Any, clean_model: Any = None,
                 train_fn: Callable[..., Any] | None = None, seed: int = 0) -> None:
    """The contract of the attack registered as ``name``, with ``poison()`` run on ``train``.

    Args:
        name: the attack's registry name.
        train, test: small ImageSets (an attack whose defaults do not fit their images fails its
            ``check``; give images of the size its defaults assume, e.g. 32x32x3).
        clean_model: a model trained on ``train``, for attacks that need a surrogate.
        train_fn: ``train_fn(imageset) -> model``, for attacks that train their own surrogate.
        seed: the poisoning seed.
    """
    from poisonlab.attacks import ATTACKS, AttackContext, get_attack

    check_parameters("attack", name, get_attack, ATTACKS.get(name))
    quick = {k: v for k, v in QUICK_PARAMS.items() if k in ATTACKS.defaults(name)}
    attack = get_attack(name, **quick)
    ctx = AttackContext(test=test, clean_model=clean_model, train_fn=train_fn)
    poisoned, record = attack.poison(train, seed=seed, context=ctx)
    check_recorded_indices(name, train, poisoned, record)
    if record.trigger is not None:
        check_trigger_cache(name, record.trigger, test.images[:8])


def check_recorded_indices(name: str, train: Any, poisoned: Any, record: Any) -> None:
    """``record.indices`` is exactly the set of training samples whose image or label changed."""
    idx = np.asarray(record.indices)
    if len(poisoned) != len(train):  # an attack that adds samples: its indices must still be valid
        if len(idx) and (idx.min() < 0 or idx.max() >= len(poisoned)):
            raise ContractError(f"attack {name!r}: recorded indices outside the poisoned set")
        return
    changed = np.nonzero((poisoned.images != train.images).reshape(len(train), -1).any(1)
                         | (poisoned.labels != train.labels))[0]
    if not np.array_equal(np.sort(idx), changed):
        unrecorded = np.setdiff1d(changed, idx)[:10].tolist()
        unchanged = np.setdiff1d(idx, changed)[:10].tolist()
        raise ContractError(f"attack {name!r}: poison() must record exactly the samples it changes; changed but "
                            f"not recorded: {unrecorded}, recorded but unchanged: {unchanged}")


def check_trigger_cache(name: str, trigger: Any, images: np.ndarray) -> None:
    """The trigger survives the cache's JSON + arrays round trip and stamps the same images."""
    from poisonlab.experiments.cache import trigger_from_spec, trigger_to_spec

    stored = trigger_to_spec(trigger)
    if stored is None:
        raise ContractError(f"attack {name!r}: its trigger {type(trigger).__name__} is not a dataclass of JSON "
                            f"values and arrays, so the cache cannot store it and the poisoned set is recomputed "
                            f"on every run; make it a @dataclass sub-class of poisonlab.attacks.Trigger")
    spec, arrays = stored
    back = trigger_from_spec(json.loads(json.dumps(spec)), arrays)
    if not np.array_equal(back.apply(images), trigger.apply(images)):
        raise ContractError(f"attack {name!r}: its trigger stamps different images after the cache round trip")
