"""Streamed activation mining: the top-k and bottom-k images of every unit of chosen layers.

A unit is one channel of a layer; its activation for an image is the spatial mean of that channel
of the layer's output.  :class:`ActivationMiner` hooks the chosen layers, runs ONE forward pass per
batch for all of them, and merges each batch into running top-k / bottom-k buffers that stay on
the model's device (one ``torch.topk`` over ``[running, batch]`` per layer and side) — no pass per
unit and no copy of all activations.  It also keeps per-channel count, min, max, sum and sum of
squares (float64) to find dead units (constant over the dataset: ``max == min``).

Ordering is exact and deterministic.  Activations are ranked as float32 values; ties (common after
a ReLU, where many images give exactly 0) are broken by a seeded random order of the images, its own
for every unit (``tie_seed``), never by dataset order — an ImageFolder is sorted by class, so an
index tie-break would hand a unit's minima to the first classes.  Each (activation, image) pair is
packed into one int64 key (an order-preserving integer image of the float32 value in the high 32
bits, a keyed bijective scramble of the dataset index in the low 32 bits), so ``topk`` never meets
a tie, the index is recovered exactly, and the result depends neither on the batch size nor on the
order in which batches arrive or ranks share them.  Dataset indices must lie in ``[0, 2**32)``.

:func:`mine` streams one split of an ImageFolder tree through the miner, resumably.

    with ActivationMiner(model, ["inception4a"], k=200) as miner:
        for images, indices in batches:
            miner.update(images, indices)
    top = miner.result()["inception4a"].top_indices      # [C, 200], most activating first
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pruning.data.folders import DataLayoutError, ImageFolderDataset, build_transform, decodes_on_device, split_dir
from pruning.data.jpeg import decoded_spans
from pruning.models.checkpoint import atomic_save
from pruning.models.modes import eval_mode
from pruning.models.layers import find_layer, unwrap
from sparsight.files import json_digest

STATE_FORMAT = "sparsight-mining-state/1"
PRECISIONS = ("fp32", "bf16")
RESULT_FORMAT = "sparsight-mining/1"
_LOW = 2 ** 32          # the dataset index lives in the low 32 bits of a key
_LOW_MASK = _LOW - 1


# ---- order-preserving keys ---------------------------------------------------------------------
def _ordered_int(values: torch.Tensor) -> torch.Tensor:
    """float32 → int64 with the same order (``-0.0`` folded onto ``+0.0``)."""
    bits = (values.float() + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def _from_ordered_int(ordered: torch.Tensor) -> torch.Tensor:
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    return bits.view(torch.float32)


_MIX1, _MIX2 = 0x85EBCA6B, 0xC2B2AE35           # murmur3's finalizer constants (odd: invertible mod 2**32)
_UNMIX1, _UNMIX2 = pow(_MIX1, -1, _LOW), pow(_MIX2, -1, _LOW)


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x · m mod 2**32`` for ``x`` in ``[0, 2**32)`` without int64 overflow (``m`` split in 16-bit halves)."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _LOW_MASK


def _unshift(y: torch.Tensor, shift: int) -> torch.Tensor:
    """Inverse of ``x ^ (x >> shift)`` on 32-bit values."""
    x = y
    for _ in range(-(-32 // shift)):
        x = y ^ (x >> shift)
    return x


def scramble(indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A keyed bijection of ``[0, 2**32)`` (one permutation per key): xor the key, then murmur3's mixer."""
    x = indices ^ keys
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def unscramble(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`scramble`."""
    x = _unshift(x, 16)
    x = _mul32(x, _UNMIX2)
    x = _unshift(x, 13)
    x = _mul32(x, _UNMIX1)
    return _unshift(x, 16) ^ keys


def tie_keys(layer: str, channels, seed: int) -> torch.Tensor:
    """``[C]`` permutation keys of one layer: every unit orders tied images its own seeded random way.

    ``channels``: the number of channels, or the unit index of each channel (a physically pruned
    model's channels keep their parent's keys, so ties break as in the masked model)."""
    units = range(channels) if isinstance(channels, int) else channels
    keys = [int.from_bytes(hashlib.blake2b(f"sparsight-ties/{int(seed)}/{layer}/{int(u)}".encode(),
                                           digest_size=4).digest(), "little") for u in units]
    return torch.tensor(keys, dtype=torch.long)


def tie_ranks(indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` position of each image among ties for each unit (smaller first, both sides)."""
    return scramble(indices.long()[:, None], keys.to(indices.device)[None, :])


def _keys(values: torch.Tensor, indices: torch.Tensor, ties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of ``values [B, C]`` for images ``indices [B]``, as ``[C, B]``: (top, bottom).

    Top: larger key = larger value, then smaller tie rank (for ``topk(largest=True)``).
    Bottom: smaller key = smaller value, then smaller tie rank (for ``topk(largest=False)``).
    """
    high = _ordered_int(values) * _LOW
    rank = tie_ranks(indices, ties)
    return (high + (_LOW_MASK - rank)).t(), (high + rank).t()


def _decode(keys: torch.Tensor, top: bool, ties: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low = keys & _LOW_MASK
    rank = (_LOW_MASK - low) if top else low
    return _from_ordered_int(keys >> 32), unscramble(rank, ties.to(keys.device)[:, None])


def spatial_mean(output: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` → ``[B, C]`` float32 unit activations (averaged in float64 for float64 models)."""
    if output.dim() < 2:
        raise ValueError(f"cannot take units of an output of shape {tuple(output.shape)}; need [B, C, ...]")
    x = output.detach()
    if x.dim() > 2:
        x = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x.float()


# ---- results -----------------------------------------------------------------------------------
@dataclass
class LayerMining:
    """Mined exemplars and statistics of every channel of one layer (all tensors on the CPU).

    ``top_*`` are sorted most activating first, ``bottom_*`` least activating (most negative) first;
    ties follow the unit's seeded random order (:func:`tie_ranks`).  ``k`` is the number of columns: the requested k, or the
    number of images seen if that was smaller.  ``std`` is the population standard deviation.
    ``recorded[unit]`` holds a unit's activation for every dataset index (``NaN`` for an index
    that was not seen, e.g. a corrupt image); only units named in ``record`` are present.
    """
    layer: str
    top_values: torch.Tensor        # [C, k] float32, descending
    top_indices: torch.Tensor       # [C, k] int64
    bottom_values: torch.Tensor     # [C, k] float32, ascending
    bottom_indices: torch.Tensor    # [C, k] int64
    count: torch.Tensor             # [C] int64
    min: torch.Tensor               # [C] float32
    max: torch.Tensor               # [C] float32
    mean: torch.Tensor              # [C] float64
    std: torch.Tensor               # [C] float64
    dead: torch.Tensor              # [C] bool: constant over the dataset
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.top_indices.shape[1]

    @property
    def num_channels(self) -> int:
        return self.top_indices.shape[0]

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "recorded"}
        d["recorded"] = {int(u): v for u, v in self.recorded.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerMining:
        return cls(**d)


@dataclass
class MiningResult:
    """The outcome of :func:`mine`: per-layer mining, image counts, and the index → file map."""
    layers: dict[str, LayerMining]
    n_images: int                   # images mined
    skipped: int                    # corrupt images skipped
    files: list[str]                # dataset index → image path
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write a file loadable with ``torch.load(..., weights_only=True)``."""
        obj = {"format": RESULT_FORMAT, "layers": {n: lm.to_dict() for n, lm in self.layers.items()},
               "n_images": int(self.n_images), "skipped": int(self.skipped), "files": list(self.files),
               "meta": dict(self.meta)}
        return atomic_save(obj, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MiningResult:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            raise ValueError(f"cannot read mining result {path}: {type(err).__name__}: {err}") from None
        if not isinstance(obj, dict) or obj.get("format") != RESULT_FORMAT:
            raise ValueError(f"{path} is not a sparsight mining result")
        return cls({n: LayerMining.from_dict(d) for n, d in obj["layers"].items()}, obj["n_images"], obj["skipped"],
                   obj["files"], obj.get("meta", {}))


# ---- the miner ---------------------------------------------------------------------------------
class _LayerState:
    """Running buffers of one layer, on the device (created at the first batch)."""

    def __init__(self, channels: int, device: torch.device, ties: torch.Tensor):
        self.ties = ties.to(device)      # [C] per-unit keys of the tie order
        # top / bottom: packed keys of the running top-k / bottom-k, unordered within a row
        empty = torch.empty(channels, 0, dtype=torch.long, device=device)
        self.top, self.bottom = empty, empty.clone()
        self.min = torch.full((channels,), float("inf"), device=device)
        self.max = torch.full((channels,), float("-inf"), device=device)
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.rec_indices: list[torch.Tensor] = []
        self.rec_values: list[torch.Tensor] = []

    def merge(self, acts: torch.Tensor, indices: torch.Tensor, k: int, units: list[int]) -> None:
        """Fold a batch (``acts [B, C]`` float32, ``indices [B]``) into the running buffers."""
        top_keys, bottom_keys = _keys(acts, indices, self.ties)
        top = torch.cat([self.top, top_keys], dim=1)
        bottom = torch.cat([self.bottom, bottom_keys], dim=1)
        m = min(k, top.shape[1])
        self.top = torch.topk(top, m, dim=1, largest=True, sorted=False).values    # sorted in result()
        self.bottom = torch.topk(bottom, m, dim=1, largest=False, sorted=False).values
        torch.minimum(self.min, acts.amin(0), out=self.min)
        torch.maximum(self.max, acts.amax(0), out=self.max)
        a64 = acts.double()
        self.sum += a64.sum(0)
        self.sumsq += a64.square().sum(0)
        if units:
            self.rec_indices.append(indices)
            self.rec_values.append(acts[:, units])

    def state(self) -> dict:
        def cat(chunks, shape):
            return torch.cat(chunks).cpu() if chunks else torch.empty(shape)
        return {"top": self.top.cpu(), "bottom": self.bottom.cpu(), "min": self.min.cpu(), "max": self.max.cpu(),
                "sum": self.sum.cpu(), "sumsq": self.sumsq.cpu(),
                "rec_indices": cat(self.rec_indices, (0,)).long(),
                "rec_values": cat(self.rec_values, (0, 0))}

    @classmethod
    def from_state(cls, s: dict, device: torch.device, ties: torch.Tensor) -> _LayerState:
        st = cls(s["top"].shape[0], device, ties)
        for name in ("top", "bottom", "min", "max", "sum", "sumsq"):   # copies: merging updates them in place
            setattr(st, name, s[name].to(device, copy=True))
        if s["rec_indices"].numel():
            st.rec_indices, st.rec_values = [s["rec_indices"].to(device)], [s["rec_values"].to(device)]
        return st


class ActivationMiner:
    """Running top-k / bottom-k images and statistics for every channel of ``layers``.

    One forward hook per layer; hooks only collect while :meth:`update` runs, and are removed by
    :meth:`close` or on leaving a ``with`` block.  ``update`` runs under ``no_grad`` but does not
    change train/eval mode (:func:`mine` puts the model in eval mode).  ``record`` maps a layer to a
    few units whose full activation vectors are kept (for percentile-based query selection).
    If fewer than ``k`` images are seen, the result has as many columns as images seen.
    """

    def __init__(self, model: nn.Module, layers: list[str], k: int, *, device=None,
                 record: dict[str, list[int]] | None = None, tie_seed: int = 0,
                 channel_map: dict[str, list[int]] | None = None):
        if isinstance(layers, str):
            layers = [layers]
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise ValueError("no layers to mine")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        modules = {name: find_layer(model, name) for name in layers}
        extra = sorted(set(record or {}) - set(layers))
        if extra:
            raise ValueError(f"record names layer {extra[0]!r}, which is not mined; choose from {layers}")
        params = [p for p in model.parameters() if p.is_floating_point()]
        self.model, self.layers, self.k = model, layers, int(k)
        self.device = torch.device(device) if device is not None else (params[0].device if params else
                                                                         torch.device("cpu"))
        self.dtype = params[0].dtype if params else None
        self.record = {name: sorted({int(u) for u in units}) for name, units in (record or {}).items()}
        self.tie_seed = int(tie_seed)
        self.channel_map = {n: [int(c) for c in m] for n, m in (channel_map or {}).items() if n in layers}
        self.n_seen = 0
        self._states: dict[str, _LayerState] = {}
        self._batch: dict[str, torch.Tensor] | None = None
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    # hooks
    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._batch is None:     # a forward pass outside update(): not ours
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor; mine a "
                                f"submodule that returns one")
            if name in self._batch:
                raise RuntimeError(f"layer {name!r} ran more than once in one forward pass; mine a module that "
                                   f"is called once")
            self._batch[name] = spatial_mean(output)
        return hook

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> ActivationMiner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # mining
    @torch.no_grad()
    def update(self, images: torch.Tensor, indices) -> None:
        """Mine one batch; ``indices`` are the dataset indices of ``images`` (distinct over the dataset)."""
        if not self._handles:
            raise RuntimeError("this ActivationMiner is closed")
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.dim() != 1 or len(indices) != len(images):
            raise ValueError(f"got {len(images)} images but indices of shape {tuple(indices.shape)}")
        if len(indices) == 0:
            return
        if indices.device.type == "cpu" and (int(indices.min()) < 0 or int(indices.max()) >= _LOW):
            raise ValueError(f"dataset indices must lie in [0, 2**32); got {int(indices.min())}..{int(indices.max())}")
        images = images.to(self.device, dtype=self.dtype if images.is_floating_point() and self.dtype else None,
                           non_blocking=True)
        self._batch = {}
        try:
            self.model(images)
            batch = self._batch
        finally:
            self._batch = None
        missing = [name for name in self.layers if name not in batch]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the forward pass (is it used in eval mode?)")
        indices = indices.to(self.device, non_blocking=True)
        for name in self.layers:
            acts = batch[name]
            if name not in self._states:
                self._states[name] = _LayerState(acts.shape[1], self.device, self._ties(name, acts.shape[1]))
                bad = [u for u in self.record.get(name, []) if not 0 <= u < acts.shape[1]]
                if bad:
                    raise ValueError(f"cannot record unit {bad[0]} of {name!r}: it has {acts.shape[1]} channels")
            self._states[name].merge(acts, indices, self.k, self.record.get(name, []))
        self.n_seen += len(indices)

    # checkpointing
    def _ties(self, layer: str, channels: int) -> torch.Tensor:
        units = self.channel_map.get(layer)
        if units is not None and len(units) != channels:
            raise ValueError(f"channel map of {layer!r} names {len(units)} channels; the layer has {channels}")
        return tie_keys(layer, units if units is not None else channels, self.tie_seed)

    def _config(self) -> dict:
        return {"layers": list(self.layers), "k": self.k, "record": {n: list(u) for n, u in self.record.items()},
                "tie_seed": self.tie_seed, "channel_map": self.channel_map}

    def state_dict(self) -> dict:
        """Everything needed to continue mining later (CPU tensors, lists, numbers)."""
        return {"config": self._config(), "n_seen": self.n_seen,
                "layers": {name: st.state() for name, st in self._states.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self._config():
            raise ValueError(f"mining state is for {state.get('config')}, not {self._config()}")
        self.n_seen = int(state["n_seen"])
        self._states = {name: _LayerState.from_state(s, self.device, self._ties(name, s["top"].shape[0]))
                        for name, s in state["layers"].items()}

    def absorb(self, state: dict) -> None:
        """Fold in another miner's :meth:`state_dict` (e.g. another rank's share of the images).

        Top-k keys, minima, maxima and sums combine exactly as if one miner had seen both shares.
        """
        if state.get("config") != self._config():
            raise ValueError(f"mining state is for {state.get('config')}, not {self._config()}")
        for name, s in state["layers"].items():
            other = _LayerState.from_state(s, self.device, self._ties(name, s["top"].shape[0]))
            mine = self._states.get(name)
            if mine is None:
                self._states[name] = other
                continue
            m = min(self.k, mine.top.shape[1] + other.top.shape[1])
            mine.top = torch.topk(torch.cat([mine.top, other.top], 1), m, dim=1, sorted=False).values
            mine.bottom = torch.topk(torch.cat([mine.bottom, other.bottom], 1), m, dim=1, largest=False,
                                     sorted=False).values
            torch.minimum(mine.min, other.min, out=mine.min)
            torch.maximum(mine.max, other.max, out=mine.max)
            mine.sum += other.sum
            mine.sumsq += other.sumsq
            mine.rec_indices += other.rec_indices
            mine.rec_values += other.rec_values
        self.n_seen += int(state["n_seen"])

    def result(self) -> dict[str, LayerMining]:
        """Per-layer :class:`LayerMining` on the CPU."""
        if self.n_seen == 0:
            raise RuntimeError("no images have been mined yet")
        return {name: self._layer_result(name, self._states[name]) for name in self.layers}

    def _layer_result(self, name: str, st: _LayerState) -> LayerMining:
        s = st.state()
        n = self.n_seen
        top_values, top_indices = _decode(s["top"].sort(dim=1, descending=True).values, True, st.ties.cpu())
        bottom_values, bottom_indices = _decode(s["bottom"].sort(dim=1).values, False, st.ties.cpu())
        mean = s["sum"] / n
        std = (s["sumsq"] / n - mean.square()).clamp_min(0).sqrt()
        recorded = {}
        if s["rec_indices"].numel():
            size = int(s["rec_indices"].max()) + 1
            for j, unit in enumerate(self.record.get(name, [])):
                vec = torch.full((size,), float("nan"))
                vec[s["rec_indices"]] = s["rec_values"][:, j]
                recorded[unit] = vec
        return LayerMining(name, top_values, top_indices, bottom_values, bottom_indices,
                           torch.full((len(mean),), n, dtype=torch.long), s["min"], s["max"], mean, std,
                           s["max"] == s["min"], recorded)


# ---- streaming a folder ------------------------------------------------------------------------
class IndexedImages(Dataset):
    """``(image, dataset index)`` pairs of an ImageFolder; ``None`` for a corrupt image."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (item[0], index)


@dataclass
class IndexedBatch:
    images: torch.Tensor
    indices: torch.Tensor
    positions: int                  # dataset positions covered, corrupt ones included
    skipped: int

    def pin_memory(self) -> IndexedBatch:
        return IndexedBatch(self.images.pin_memory(), self.indices.pin_memory(), self.positions, self.skipped)


def collate_indexed(items) -> IndexedBatch:
    good = [it for it in items if it is not None]
    images = torch.stack([g[0] for g in good]) if good else torch.empty(0)
    indices = torch.as_tensor([g[1] for g in good], dtype=torch.long)
    return IndexedBatch(images, indices, len(items), len(items) - len(good))


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in unwrap(model).state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint(model: nn.Module, split_root: Path, files: list[str], *, split: str, layers: list[str], k: int,
                 image_size: int, record, tie_seed: int = 0) -> str:
    rel = [Path(f).relative_to(split_root).as_posix() for f in files]
    return json_digest({"arch": getattr(unwrap(model), "arch", type(unwrap(model)).__name__),
                        "weights": _weights_digest(model), "split": split, "layers": list(layers), "k": int(k),
                        "image_size": int(image_size), "record": record, "ties": f"scrambled/{int(tie_seed)}",
                        "files": hashlib.sha256("\n".join(rel).encode()).hexdigest()})


def _read_state(path: Path, fingerprint: str) -> dict | None:
    """A saved state written for these arguments, or ``None`` (with a warning when one is ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        warnings.warn(f"ignoring unreadable mining state {path}: {type(err).__name__}: {err}", stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        warnings.warn(f"ignoring mining state {path}: it was written for other arguments (model, layers, k, "
                      f"split, image size, record or files differ); starting from the beginning", stacklevel=3)
        return None
    return state


def shard_positions(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Dataset positions of ``rank``'s share: every ``world_size``-th batch of ``batch_size``, from batch ``rank``.

    Whole batches keep each image's batch (and so its floating-point result) the same as in a
    single-process pass.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    return [p for b in range(rank, math.ceil(n / batch_size), world_size)
            for p in range(b * batch_size, min((b + 1) * batch_size, n))]


def _check_pass(batch_size: int, save_every: int, precision: str) -> None:
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size and save_every must be at least 1, got {batch_size} and {save_every}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")


def _pass_fingerprint(fingerprint: str, channel_map, precision: str, shard: tuple[int, int], batch_size: int,
                      device: torch.device = torch.device("cpu"), decode: str = "auto") -> str:
    """The state fingerprint extended by what else changes a pass: channel map, precision, sharding, and
    beyond the CPU the device and its decoder (a pass stopped on the CPU does not go on with other pixels
    and other arithmetic on a GPU)."""
    rank, world = shard
    if device.type != "cpu":
        path = "device-decode" if decodes_on_device(decode, device) else "loader"
        fingerprint = hashlib.sha256(f"{fingerprint}/{device.type}/{path}".encode()).hexdigest()
    if channel_map:
        fingerprint = hashlib.sha256(f"{fingerprint}/{json.dumps(channel_map, sort_keys=True)}".encode()).hexdigest()
    if precision != "fp32":
        fingerprint = hashlib.sha256(f"{fingerprint}/{precision}".encode()).hexdigest()
    if world > 1:
        fingerprint = hashlib.sha256(f"{fingerprint}/{rank}/{world}/{batch_size}".encode()).hexdigest()
    return fingerprint


def _batches(dataset: ImageFolderDataset, todo: list[int], decode: str, device: torch.device, *, image_size: int,
             batch_size: int, on_corrupt: str, num_workers: int):
    """Batches of the dataset positions ``todo``: decoded on the device where it can, else by a DataLoader."""
    if decodes_on_device(decode, device):
        return decoded_spans(dataset.samples, todo, image_size=image_size, batch_size=batch_size,
                             device=device, on_corrupt=on_corrupt, num_workers=num_workers)
    return DataLoader(Subset(IndexedImages(dataset), todo), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_indexed, pin_memory=device.type == "cuda")


def _feed(miner, batch, device: torch.device, precision: str) -> None:
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            miner.update(batch.images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
                         batch.indices)
    else:
        miner.update(batch.images, batch.indices)


def _absorb_shares(miner, skipped: int, gather) -> int:
    """Combine every rank's share into ``miner`` (the same on every rank); return the skipped total."""
    shares = gather({"miner": miner.state_dict(), "skipped": skipped})
    miner.load_state_dict(shares[0]["miner"])
    for share in shares[1:]:
        miner.absorb(share["miner"])
    return sum(int(share["skipped"]) for share in shares)


def mine(model: nn.Module, root: str | os.PathLike, split: str, layers: list[str], k: int, *, image_size: int,
         batch_size: int = 256, device=None, num_workers: int = 0, state_path: str | os.PathLike | None = None,
         save_every: int = 50, record: dict[str, list[int]] | None = None, progress: bool = False,
         on_corrupt: str = "skip", decode: str = "auto", precision: str = "fp32", shard: tuple[int, int] = (0, 1),
         gather=None, tie_seed: int = 0, channel_map: dict[str, list[int]] | None = None) -> MiningResult:
    """Top-k / bottom-k images and statistics of every channel of ``layers`` over ``root/split``.

    One pass in the dataset's sorted order (eval mode, no gradients; training flags restored),
    resize/centre-crop to ``image_size`` with ImageNet normalization.  Corrupt images are skipped
    and counted (``on_corrupt="skip"``) or raise (``"error"``).  With ``state_path`` the miner state
    and the number of dataset positions done are saved atomically every ``save_every`` batches and
    at the end; a rerun with the same model weights, layers, k, split, image size, record and files
    continues where it stopped and gives the same result as an uninterrupted run.  A state written
    for other arguments is ignored with a warning.  On a GPU (``decode='auto'`` or ``'device'``) the
    files are decoded and cropped on the device (:func:`pruning.data.jpeg.decoded_spans`).
    Tied activations are ordered by each unit's seeded random permutation (``tie_seed``; with
    ``channel_map``, a physically pruned model's channels use their parent units' permutations).
    ``precision="bf16"`` runs the model under bf16 autocast on channels_last batches (unit means
    still accumulate in fp32): faster on a GPU, at the cost of near-ties changing order.

    Under ``torchrun`` give ``shard=(rank, world_size)`` and ``gather`` (a collective returning
    every rank's object in rank order, e.g. ``DistContext.all_gather_object``): each rank mines its
    :func:`shard_positions`, then every rank combines all shares into the full result, equal to a
    single-process pass.
    """
    _check_pass(batch_size, save_every, precision)
    split_root = split_dir(root, split)
    dataset = ImageFolderDataset(split_root, transform=build_transform(image_size, train=False), on_corrupt=on_corrupt)
    files = [path for path, _ in dataset.samples]
    if not files:
        raise DataLayoutError(f"image folder {split_root} holds no images")
    record = {name: sorted({int(u) for u in units}) for name, units in (record or {}).items()} or None
    rank, world = shard
    if world > 1 and gather is None:
        raise ValueError("a sharded pass needs gather, the collective that collects every rank's share")
    positions = shard_positions(len(files), batch_size, rank, world)
    fingerprint = _fingerprint(model, split_root, files, split=split, layers=list(layers), k=k,
                               image_size=image_size, record=record, tie_seed=tie_seed)
    params = list(model.parameters())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    fingerprint = _pass_fingerprint(fingerprint, channel_map, precision, shard, batch_size, device, decode)
    state_path = Path(state_path) if state_path is not None else None

    def save_state(miner, position, skipped):
        if state_path is not None:
            atomic_save({"format": STATE_FORMAT, "fingerprint": fingerprint, "position": position,
                                "skipped": skipped, "miner": miner.state_dict()}, state_path)

    model.to(device)
    try:
        with ActivationMiner(model, list(layers), k, device=device, record=record, tie_seed=tie_seed,
                             channel_map=channel_map) as miner, eval_mode(model):
            position, skipped = 0, 0
            saved = _read_state(state_path, fingerprint) if state_path is not None and state_path.is_file() else None
            if saved is not None:
                miner.load_state_dict(saved["miner"])
                position, skipped = int(saved["position"]), int(saved["skipped"])
            loader = _batches(dataset, positions[position:], decode, device, image_size=image_size,
                              batch_size=batch_size, on_corrupt=on_corrupt, num_workers=num_workers)
            from sparsight.progress import progress_bar

            bar = progress_bar(loader, desc=f"mine {split}", enabled=progress, leave=False)
            for b, batch in enumerate(bar, start=1):
                _feed(miner, batch, device, precision)
                position += batch.positions
                skipped += batch.skipped
                if b % save_every == 0 and position < len(positions):
                    save_state(miner, position, skipped)
            save_state(miner, position, skipped)
            if world > 1:
                skipped = _absorb_shares(miner, skipped, gather)
            layers_result = miner.result()
            n_images = miner.n_seen
    finally:
        model.to(home)
    meta = {"arch": getattr(unwrap(model), "arch", type(unwrap(model)).__name__), "split": split,
            "image_size": int(image_size), "k": int(k), "layers": list(layers), "fingerprint": fingerprint}
    return MiningResult(layers_result, n_images, skipped, files, meta)
