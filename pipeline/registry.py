"""One registry per pluggable kind (detector backends, matching models), detectron2-style.

An entry is registered either directly (:meth:`Registry.register`, a decorator) or by where it lives
(:meth:`Registry.register_lazy`, ``"package.module:attribute"``, imported on first use), so the module that
holds a registry need not import its entries: no import cycle between a registry and what it lists, and
an entry with an optional dependency costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable:
        def deco(obj):
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``target`` = ``"package.module:attribute"``, imported by the first :meth:`get`."""
        if name in self._items:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        if target.count(":") != 1:
            raise ValueError(f"{self.kind} {name!r}: lazy target must be 'package.module:attribute', got {target!r}")
        self._items[name] = target

    def get(self, name: str) -> Callable[..., Any]:
        try:
            item = self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._items))}") from None
        if isinstance(item, str):  # registered lazily: import it now, once
            module, attr = item.split(":")
            item = self._items[name] = getattr(importlib.import_module(module), attr)
        return item

    def build(self, name: str, **kwargs) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
