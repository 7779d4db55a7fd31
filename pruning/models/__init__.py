"""Model registry, the embedded default networks, and checkpoints."""
from .checkpoint import (LoadedCheckpoint, base_meta, count_flops, count_params, file_sha256, load_checkpoint,
                         measure_sparsity, read_meta, save_checkpoint, write_meta)
from .registry import MODELS, ModelSpec, WeightsError, create_model, get_spec, register_model, unwrap

__all__ = ["MODELS", "ModelSpec", "WeightsError", "create_model", "get_spec", "register_model", "unwrap",
           "LoadedCheckpoint", "base_meta", "count_flops", "count_params", "file_sha256", "load_checkpoint",
           "measure_sparsity", "read_meta", "save_checkpoint", "write_meta"]
