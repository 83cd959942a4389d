"""Parameter validation: the one home of every ``check_*`` helper.

Each helper takes the value and the parameter's name, returns the value
(converted to the plain type) when it is allowed, and otherwise raises
:class:`~poisonlab.errors.ParameterError` with one sentence naming the
parameter, the allowed range and what was given, in the style of
scikit-learn's parameter validation::

    self.rate = check_rate(rate)                       # (0, 1]
    self.eps = check_range(eps, "eps", 0, 1, lo_open=True)
    self.mode = check_choice(mode, "mode", ("a", "b"))
    self.k = check_int(k, "k", 1, 100)

Attacks, defences, the audit and the federated aggregators all validate
through these, so that an error reads the same wherever it comes from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poisonlab.errors import ParameterError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_range(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """``value`` if it is a number in the interval ``[lo, hi]`` (``lo_open``/``hi_open`` exclude an end)."""
    ok = _is_number(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ParameterError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_rate(rate: Any, name: str = "rate") -> float:
    """A share of samples: a number in (0, 1]."""
    if not _is_number(rate) or not 0 < rate <= 1:
        raise ParameterError(f"{name} must be in (0, 1], got {rate!r}")
    return float(rate)


def check_fraction_or_none(value: Any, name: str) -> float | None:
    """None, or a number in the open interval (0, 1)."""
    if value is None:
        return None
    if not _is_number(value) or not 0 < value < 1:
        raise ParameterError(f"{name} must be in (0, 1) or None, got {value!r}")
    return float(value)


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer (not a bool, not a float) in ``[lo, hi]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ParameterError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_class(value: int | None, name: str, num_classes: int, who: str) -> None:
    """A class index of a dataset with ``num_classes`` classes (None passes); ``who`` names the method."""
    if value is not None and not 0 <= value < num_classes:
        raise ParameterError(f"{who}: {name}={value} is not a class of the dataset (allowed 0..{num_classes - 1})")


def check_target_pair(target_class: int | None, adversarial_class: int | None) -> tuple[int | None, int | None]:
    """The optional target and adversarial classes of a targeted attack (non-negative, different)."""
    t = None if target_class is None else int(check_range(target_class, "target_class", 0, 10**6))
    a = None if adversarial_class is None else int(check_range(adversarial_class, "adversarial_class", 0, 10**6))
    if t is not None and t == a:
        raise ParameterError("adversarial_class must differ from target_class")
    return t, a


def check_tuning(epochs: Any, lr: Any, batch_size: Any) -> tuple[int, float, int]:
    """A short fine-tuning recipe: epochs in [1, 10000], lr in (0, 10], batch_size in [1, 65536]."""
    return (int(check_range(epochs, "epochs", 1, 10_000)), float(check_range(lr, "lr", 0, 10, lo_open=True)),
            int(check_range(batch_size, "batch_size", 1, 65_536)))


def check_beta(beta: Any) -> float:
    """Trimmed-mean cut fraction per side, in [0, 0.5): at 0.5 nothing is left to average."""
    if not _is_number(beta) or not 0 <= beta < 0.5:
        raise ParameterError(f"trimmed_mean: beta must be in [0, 0.5), got {beta!r}")
    return float(beta)


def check_krum(n: int, f: Any, m: Any = 1, who: str = "krum") -> None:
    """Krum needs ``n >= 2f + 3`` clients per round (Blanchard et al., Prop. 1) and ``1 <= m <= n - f``."""
    if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or f < 0:
        raise ParameterError(f"{who}: f must be a non-negative integer, got {f!r}")
    if n < 2 * f + 3:
        raise ParameterError(f"{who}: f={f} needs at least 2f+3 = {2 * f + 3} clients per round, got {n}")
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or not 1 <= m <= n - f:
        raise ParameterError(f"{who}: m must be in [1, n - f] = [1, {n - f}], got {m!r}")


__all__ = ["check_range", "check_rate", "check_fraction_or_none", "check_int", "check_choice", "check_class",
           "check_target_pair", "check_tuning", "check_beta", "check_krum"]
