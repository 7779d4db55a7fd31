"""Registries: name → entry, filled at each entry's definition by a decorator (as timm's ``register_model``).

::

    SCHEDULES = Registry("schedule")

    @SCHEDULES.register("oneshot")
    def oneshot(rate, steps): ...

    SCHEDULES.lookup("oneshoot")   # ValueError: unknown schedule 'oneshoot'; choose from ['oneshot', ...]

A registry is a dict in registration order, so ``list(REGISTRY)`` is its choices.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from .errors import closest

T = TypeVar("T")


class Registry(dict):
    """Named entries of one ``kind``; an unknown name raises ``error`` listing the registered ones."""

    def __init__(self, kind: str, *, error: type[Exception] = ValueError, sorted_choices: bool = True):
        super().__init__()
        self.kind, self.error, self.sorted_choices = kind, error, sorted_choices

    def register(self, name: str, entry: Callable[[T], object] | None = None) -> Callable[[T], T]:
        """Decorator: store the decorated object (or ``entry(obj)``, e.g. a spec built from it) under ``name``."""
        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered already")
            self[name] = entry(obj) if entry is not None else obj
            return obj
        return add

    def choices(self) -> list[str]:
        return sorted(self) if self.sorted_choices else list(self)

    def lookup(self, name: str):
        """The entry ``name``, or ``error("unknown <kind> 'name'; choose from [...]")``."""
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; choose from {self.choices()}"
                             f"{closest(name, self.choices())}") from None
