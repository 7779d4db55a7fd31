"""Training engine, evaluation and the distributed context."""
from .distributed import DistContext, init_distributed, open_study, resolve_device
from .engine import StopTraining, Trainer, TrainSettings, amp_dtype
from .evaluate import evaluate

__all__ = ["DistContext", "init_distributed", "open_study", "resolve_device", "StopTraining", "Trainer", "TrainSettings",
           "amp_dtype", "evaluate"]
