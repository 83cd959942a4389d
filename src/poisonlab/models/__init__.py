"""Model registry. ``build_model(name, in_channels, num_classes, image_size)``.

Every model is a :class:`Classifier`: float NCHW input in [0, 1], the
normalisation inside, ``features()`` for the penultimate layer.
"""

from __future__ import annotations

from typing import Any, Sequence

from poisonlab.models.base import Classifier, count_parameters
from poisonlab.models.zoo import CNN3, FastNet, MnistCNN, ResNet18, VGGLike
from poisonlab.registry import Registry

MODELS: Registry[Classifier] = Registry("model")
MODELS.register("fastnet")(FastNet)
MODELS.register("vgg_like")(VGGLike)
MODELS.register("cnn3")(CNN3)
MODELS.register("mnist_cnn")(MnistCNN)
MODELS.register("resnet18")(ResNet18)

MODEL_NOTES = {
    "fastnet": "fast default net (airbench-style, small widths) for quick CPU runs",
    "vgg_like": "VGG-like 32-32-64-64 + dense 512 (CIFAR-10 label-flipping study)",
    "cnn3": "3 blocks x 2 convs 64/128/256 + dense 512 (backdoor-trigger thesis)",
    "mnist_cnn": "conv 32/64/128 + dense 128 (MNIST PCA/K-means study)",
    "resnet18": "ResNet-18, CIFAR variant (3x3 stem, no stem pooling)",
}


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
