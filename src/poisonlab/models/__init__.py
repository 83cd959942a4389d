"""Model registry. ``build_model(name, in_channels, num_classes, image_size)``.

Every model is a :class:`Classifier`: float NCHW input in [0, 1], the
normalisation inside, ``features()`` for the penultimate layer. A model
registers itself in the module that defines it (``@MODELS.register("name")``)
and gives a one-line ``summary`` for ``poisonlab list``.
"""

from __future__ import annotations

from typing import Any, Sequence

from poisonlab.models import airnet, preact_resnet, zoo  # noqa: F401  (registers the models)
from poisonlab.models.base import MODELS, Classifier, count_parameters

MODEL_NOTES = {name: MODELS.get(name).summary for name in MODELS.names()}


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                **kwargs: Any) -> Classifier:
    """Build a registered model for images of ``image_size`` x ``image_size`` x ``in_channels``."""
    return MODELS.build(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                        mean=mean, std=std, **kwargs)


__all__ = ["MODELS", "build_model", "Classifier", "count_parameters", "MODEL_NOTES"]


def build_model_for(name: Any, train: Any, *, feature_layer: str | None = None, **params: Any) -> Any:
    """A model for the images of the ImageSet ``train``: channels, classes, size and normalisation from it.

    ``name`` is a registered model, a plug-in (entry point ``poisonlab.models``), an import path
    ``"mypkg.nets:MyNet"`` or the class itself; of ``in_channels, num_classes, image_size, mean, std``
    it gets those its constructor accepts, plus ``params``. A plain ``nn.Module`` without
    ``features(x)`` gets one from the layer ``feature_layer`` (see :mod:`poisonlab.models.adapters`).
    """
    from poisonlab.models.adapters import shape_arguments, with_features

    if callable(name):
        return with_features(name(**shape_arguments(name, train, params), **params), feature_layer)
    factory = MODELS.get(name)
    return with_features(MODELS.build(name, **shape_arguments(factory, train, params), **params), feature_layer)
