"""Model registry, the embedded default networks, and checkpoints."""
from .checkpoint import (LoadedCheckpoint, base_meta, count_flops, count_params, file_sha256, load_checkpoint,
                         measure_sparsity, read_meta, save_checkpoint, write_meta)
from .factory import create_model
from .layers import unwrap
from .registry import MODELS, ModelSpec, get_spec, register_model
from .weights import WeightsError

__all__ = ["MODELS", "ModelSpec", "WeightsError", "create_model", "get_spec", "register_model", "unwrap",
           "LoadedCheckpoint", "base_meta", "count_flops", "count_params", "file_sha256", "load_checkpoint",
           "measure_sparsity", "read_meta", "save_checkpoint", "write_meta"]
