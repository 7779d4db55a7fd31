"""Click choices over pruning's registries (models, methods, schedules, corruptions).

The registries import torch, so a choice reads its registry only when a command parses or shows
its options: ``sparsight --help`` and the commands of other packages never load it.
"""
from __future__ import annotations

from typing import Callable, Iterable

import click


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are a registry's names, read each time they are needed."""

    def __init__(self, names: Callable[[], Iterable[str]], case_sensitive: bool = True):
        # click.Choice.__init__ would store a fixed tuple; ``choices`` is read from the registry instead
        self.names = names
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self.names())


def model_names() -> list[str]:
    from .models.registry import MODELS
    return list(MODELS)


def method_names() -> list[str]:
    from .methods import METHODS
    return list(METHODS)


def schedule_names() -> list[str]:
    from .schedule import SCHEDULES
    return list(SCHEDULES)


def corruption_names() -> list[str]:
    from .robustness import CORRUPTIONS
    return list(CORRUPTIONS)


def model_choice() -> RegistryChoice:
    return RegistryChoice(model_names)


def method_choice() -> RegistryChoice:
    return RegistryChoice(method_names)


def schedule_choice() -> RegistryChoice:
    return RegistryChoice(schedule_names)


def corruption_choice() -> RegistryChoice:
    return RegistryChoice(corruption_names)
