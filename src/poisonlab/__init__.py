"""poisonlab: training-data poisoning of image classifiers.

The flow of data is dataset -> attack -> training -> defence -> evaluation ->
report; each stage lives in its own sub-package:

- :mod:`poisonlab.data`      ImageSet and the dataset readers
- :mod:`poisonlab.attacks`   Attack interface and the attack catalogue
- :mod:`poisonlab.models`    model registry
- :mod:`poisonlab.training`  the one training loop and batched augmentation
- :mod:`poisonlab.defenses`  data filters, training-time, repair, detection
- :mod:`poisonlab.metrics`   accuracy, F1, ASR, detection metrics
- :mod:`poisonlab.experiments` config schema and the experiment runner
- :mod:`poisonlab.report`    plots and reports

The names below are imported on first use (PEP 562), so that ``import poisonlab``
and the command line's ``--help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ImageSet": "poisonlab.data",
    "load_dataset": "poisonlab.data",
    "load_data": "poisonlab.data",
    "Attack": "poisonlab.attacks",
    "Poisoning": "poisonlab.attacks",
    "get_attack": "poisonlab.attacks",
    "get_defense": "poisonlab.defenses",
    "build_model": "poisonlab.models",
    "build_model_for": "poisonlab.models",
    "TrainConfig": "poisonlab.training",
    "fit": "poisonlab.training",
    "predict_proba": "poisonlab.training",
    "evaluate": "poisonlab.metrics",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'poisonlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
