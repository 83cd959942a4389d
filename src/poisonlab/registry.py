"""A tiny name -> class registry shared by attacks, defences and models.

Adding an attack is one module plus ``@ATTACKS.register("name")`` on its class;
configs, the CLI's ``list`` command and the experiment runner all read the
registry, so nothing else changes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from poisonlab.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

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
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

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

    def defaults(self, name: str) -> dict[str, Any]:
        """Parameter names and their defaults, for ``poisonlab list``."""
        sig = inspect.signature(self.get(name))
        return {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
