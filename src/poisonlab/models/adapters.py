"""Your own ``nn.Module`` as a poisonlab model: shape arguments, and penultimate features by hook.

poisonlab's own models are :class:`~poisonlab.models.Classifier` objects: they take float
NCHW images in [0, 1] and have ``features(x)``, the penultimate layer that activation
clustering, spectral signatures and the other feature-based defences read. A plain
``nn.Module`` gets the same two things here:

- :func:`shape_arguments` passes it ``in_channels``, ``num_classes``, ``image_size``, ``mean``
  and ``std`` of the training set, but only those its constructor accepts;
- :func:`with_features` keeps a model that has a ``features(x)`` method as it is, and
  otherwise wraps it in :class:`HookedFeatures`, whose ``features(x)`` is the output of the
  layer named ``feature_layer`` (e.g. ``"fc1"``) captured by a forward hook and flattened to
  ``(N, D)``. Without either, ``features(x)`` raises a :class:`ConfigError` that names both
  ways, instead of an ``AttributeError`` deep inside a defence.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from poisonlab.errors import ConfigError

SHAPE_ARGUMENTS = ("in_channels", "num_classes", "image_size", "mean", "std")


def shape_arguments(factory: Callable[..., Any], train: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments among :data:`SHAPE_ARGUMENTS` that ``factory`` accepts, taken from the ImageSet ``train``.

    A factory with ``**kwargs`` gets all of them; arguments in ``given`` are left to the caller.
    """
    h, _, c = train.shape
    mean, std = train.channel_stats()
    values = {"in_channels": c, "num_classes": train.num_classes, "image_size": h, "mean": mean, "std": std}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C factory: pass nothing we are not sure of
        return {}
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in values.items() if (open_kwargs or k in params) and k not in (given or {})}


def has_features(model: nn.Module) -> bool:
    """Whether ``model`` has a ``features(x)`` method (a sub-module called ``features``, as in VGG, is not one)."""
    f = getattr(model, "features", None)
    return callable(f) and not isinstance(f, nn.Module)


def with_features(model: nn.Module, feature_layer: str | None = None) -> nn.Module:
    """``model`` if it has ``features(x)`` and no ``feature_layer`` is asked for, else a :class:`HookedFeatures`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"a model must be a torch.nn.Module, got {type(model).__name__}")
    if feature_layer is None and has_features(model):
        return model
    return HookedFeatures(model, feature_layer)


class HookedFeatures(nn.Module):
    """A model whose ``features(x)`` is the flattened output of one of its layers.

    ``forward`` is the wrapped model's; every other attribute is looked up on the wrapped model
    (``last_conv``, ``body``, data-dependent initialisation ...), so the training loop and the
    defences see the model they expect. The state dict holds the wrapped model under ``net.``.

    Args:
        net: any ``nn.Module`` taking float NCHW images in [0, 1] and returning logits.
        feature_layer: the name of a sub-module as in ``net.named_modules()`` (``"fc1"``,
            ``"layer4.1"``); None leaves ``features`` unavailable, with an error saying how to fix it.
    """

    def __init__(self, net: nn.Module, feature_layer: str | None = None):
        super().__init__()
        self.net = net
        self.feature_layer = feature_layer
        if feature_layer is not None and feature_layer not in dict(net.named_modules()):
            names = [n for n, _ in net.named_modules() if n][:30]
            raise ConfigError(f"feature_layer {feature_layer!r} is not a layer of {type(net).__name__}; "
                              f"its layers: {', '.join(names)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The output of ``feature_layer`` for ``x``, flattened to ``(N, D)``."""
        if self.feature_layer is None:
            names = [n for n, _ in self.net.named_modules() if n][-8:]
            raise ConfigError(
                f"{type(self.net).__name__} has no features(x) method, and this needs its penultimate features: "
                f"either name the layer, feature_layer = \"<layer>\" in the config's [model] (one of "
                f"{', '.join(names) or 'its layers'}; Python: build_model_for(..., feature_layer=...)), or give "
                f"the class a features(x) method returning the penultimate activations")
        captured: list[torch.Tensor] = []
        layer = self.net.get_submodule(self.feature_layer)
        handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.net(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The wrapped model's own ``last_conv`` if it has one, else its last ``Conv2d``."""
        own = getattr(self.net, "last_conv", None)
        if isinstance(own, nn.Conv2d):
            return own
        convs = [m for m in self.net.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ConfigError(f"{type(self.net).__name__} has no Conv2d layer")
        return convs[-1]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "net":
                raise
            return getattr(super().__getattr__("net"), name)
