"""Training/eval mode for the length of a block, every module's own flag restored afterwards.

``model.train(was_training)`` would set one flag on every submodule, so a layer kept in eval mode on
purpose (a frozen BatchNorm) would come back training; and without ``finally`` an error would leave the
model in the mode the block asked for.  This is the one place a module's mode is changed and undone.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(*models: nn.Module, training: bool):
    """``models`` in training (``training=True``) or eval mode inside the block; each module's own flag back
    afterwards, whatever happens."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(*models: nn.Module):
    """``models`` in eval mode inside the block (:func:`module_mode`)."""
    return module_mode(*models, training=False)
