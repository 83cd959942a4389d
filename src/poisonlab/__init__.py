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
"""

__version__ = "0.1.0"

from poisonlab.data import ImageSet, load_dataset  # noqa: E402
from poisonlab.attacks import Attack, Poisoning, get_attack  # noqa: E402
from poisonlab.models import build_model  # noqa: E402
from poisonlab.training import TrainConfig, fit, predict_proba  # noqa: E402
from poisonlab.metrics import evaluate  # noqa: E402

__all__ = [
    "ImageSet",
    "load_dataset",
    "Attack",
    "Poisoning",
    "get_attack",
    "build_model",
    "TrainConfig",
    "fit",
    "predict_proba",
    "evaluate",
    "__version__",
]
