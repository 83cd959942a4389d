"""A tiny name -> class registry shared by attacks, defences and models.

Adding an attack is one module plus ``@ATTACKS.register("name")`` on its class;
configs, the CLI's ``list`` command and the experiment runner all read the
registry, so nothing else changes. A name that is not registered is looked up
as an import path (``"mypkg.nets:MyNet"``) or as an installed entry point of
the registry's group (``poisonlab.attacks``, ``poisonlab.defenses``,
``poisonlab.models``; see :mod:`poisonlab.plugins`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from poisonlab import plugins
from poisonlab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self.plugin_errors: dict[str, str] = {}  # entry points that failed to load, for `poisonlab list`

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``, else the one an import path or an entry point names."""
        if name in self._items:
            return self._items[name]
        if plugins.is_import_path(name):
            obj = plugins.load_object(name, self.kind)
            if not callable(obj):
                raise ConfigError(f"{self.kind} {name!r} names a {type(obj).__name__}, not a class or function")
            return obj
        ep = self._entry_points().get(name)
        if ep is not None:
            return self._register_plugin(name, plugins.load_entry_point(self.kind, ep))
        raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())} "
                          f"(or an import path such as 'mypkg.module:Class')")

    def _entry_points(self) -> dict[str, Any]:
        if self.kind not in plugins.ENTRY_POINT_GROUPS:
            return {}
        return {k: v for k, v in plugins.entry_points(self.kind).items() if k not in self._items}

    def _register_plugin(self, name: str, obj: Any) -> Callable[..., T]:
        if not callable(obj):
            raise ConfigError(f"{self.kind} {name!r} (entry point) is a {type(obj).__name__}, not a class or function")
        self.register(name)(obj)
        return obj

    def load_plugins(self) -> None:
        """Load every installed entry point of this registry's group; failures go to :attr:`plugin_errors`."""
        for name, ep in self._entry_points().items():
            try:
                self._register_plugin(name, plugins.load_entry_point(self.kind, ep))
            except ConfigError as e:
                self.plugin_errors[name] = str(e)

    def build(self, name: str, **params: Any) -> T:
        """Build ``name`` with ``params``; unknown parameter names are an error."""
        factory = self.get(name)
        sig = inspect.signature(factory)
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not accepts_kwargs:
            allowed = {k for k in sig.parameters if k != "self"}
            unknown = sorted(set(params) - allowed)
            if unknown:
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                    f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
                )
        return factory(**params)

    def create(self, name: str, base: type, /, **params: Any) -> Any:
        """:meth:`build`, then check that the result is a ``base`` and record ``name`` on it (``registry_name``)."""
        obj = self.build(name, **params)
        if not isinstance(obj, base):
            raise ConfigError(f"{self.kind} {name!r} built a {type(obj).__name__}, not a "
                              f"{base.__module__.rsplit('.', 1)[0]}.{base.__name__}")
        obj.registry_name = name
        return obj

    def defaults(self, name: str) -> dict[str, Any]:
        """Parameter names and their defaults, for ``poisonlab list``."""
        sig = inspect.signature(self.get(name))
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }

    def names(self) -> list[str]:
        """Registered names, installed plug-ins included."""
        self.load_plugins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        """Whether ``get(name)`` finds something (a failing import path or plug-in counts as absent)."""
        if name in self._items:
            return True
        try:
            self.get(name)  # type: ignore[arg-type]
        except ConfigError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
