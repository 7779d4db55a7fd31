"""Pruning methods: small scoring objects in a registry; each turns (model, rate) into masks.

Every method returns boolean masks keyed by parameter name (see :mod:`pruning.masks`).  Importing
this module registers every built-in method, in this order: the magnitude methods and the random
control (:mod:`pruning.magnitude`), then the filter-relevance criteria (:mod:`pruning.criteria`).
The registry and the factory live in :mod:`pruning.method_base`; take them from here.
"""
from __future__ import annotations

from . import magnitude  # noqa: F401  (registers unstructured-local … imp first)
from . import criteria  # noqa: F401  (then weight, gradient, taylor, lrp)
from .method_base import (METHODS, PruningError, PruningMethod, check_rate, create_method, method_class,
                          method_options, prunable_layers, register_method)

__all__ = ["METHODS", "PruningError", "PruningMethod", "check_rate", "create_method", "method_class",
           "method_options", "prunable_layers", "register_method"]
