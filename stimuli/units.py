"""Units: one channel of a named layer, written ``"inception4a:3"``; parsing and seeded sampling.

Strings are parsed here and nowhere else.  A unit list in a study is either explicit
(``"inception4a:3"``, ``"inception4a:0-7"``), or sampled with a seed: ``per-layer`` draws
``units_per_layer`` channels from every layer, ``imi`` repeats "pick a layer uniformly, then a
channel" (Zimmermann et al. 2023) until it has ``units_per_layer × layers`` distinct units, and
``all`` takes every channel.  Sampling uses the *parent's* channel counts, so every model of a
study is probed at the same units; units that are dead in a model are skipped there and recorded.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

from sparsight.files import stable_int

if TYPE_CHECKING:       # units are named and sampled without torch (the survey app reads them too)
    from torch import nn

SAMPLINGS = ("per-layer", "imi", "all")


@dataclass(frozen=True, order=True)
class Unit:
    layer: str
    unit: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.unit}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        """``"inception4a:3"`` → ``Unit("inception4a", 3)``: exactly one unit (ranges: :func:`parse_units`)."""
        units = parse_units(text)
        if len(units) != 1:
            raise ValueError(f"{text!r} names {len(units)} units; write one LAYER:INDEX, e.g. 'inception4a:3'")
        return units[0]


_UNIT = re.compile(r"^(?P<layer>[A-Za-z_][\w.]*):(?P<start>\d+)(?:-(?P<stop>\d+))?$")


#: Why a study unit has no stimuli or dissection in a physically pruned model that removed its channel.
REMOVED_CHANNEL = "channel removed by physical pruning"


class ChannelMap:
    """Study units (the parent's channel indices) → one model's channels: a physically pruned model renumbers
    them, from the checkpoint's ``channel_map`` (layer → the parent channel of each surviving channel); ``None``
    where the channel was removed; the same index in a model that was not pruned physically."""

    def __init__(self, channel_map: dict[str, list[int]] | None):
        self.map = {layer: list(m) for layer, m in (channel_map or {}).items()}
        self.position = {layer: {parent: child for child, parent in enumerate(m)} for layer, m in self.map.items()}

    def __call__(self, u: Unit) -> int | None:
        return self.position[u.layer].get(u.unit) if u.layer in self.position else u.unit

    def for_layers(self, layers) -> dict[str, list[int]] | None:
        return {k: v for k, v in self.map.items() if k in layers} or None


def parse_units(text: str) -> list[Unit]:
    """``"layer:3"`` → one unit; ``"layer:0-7"`` → units 0..7 (inclusive)."""
    m = _UNIT.match(text.strip())
    if not m:
        raise ValueError(f"cannot parse unit {text!r}; write LAYER:INDEX or LAYER:FIRST-LAST, e.g. 'inception4a:3'")
    start = int(m["start"])
    stop = int(m["stop"]) if m["stop"] is not None else start
    if stop < start:
        raise ValueError(f"unit range {text!r} ends before it starts")
    return [Unit(m["layer"], u) for u in range(start, stop + 1)]


def split_unit_name(text) -> tuple[str, int | None]:
    """A unit name from a table, leniently: ``"inception4a:3"`` → ``("inception4a", 3)``; a name without
    ``:INDEX`` (e.g. a label in imported data) gives ``(name, None)``."""
    layer, sep, index = str(text).rpartition(":")
    if sep and index.strip().lstrip("-").isdigit():
        return layer, int(index)
    return str(text), None


def layer_channels(model: nn.Module, layers: list[str], input_size: int) -> dict[str, int]:
    """Output channels of each named layer (traced with one forward pass on a blank image)."""
    from pruning.models.layers import find_layer, trace_blank, unwrap

    model = unwrap(model)
    modules = {name: find_layer(model, name) for name in layers}
    shapes, handles = {}, []
    for name in layers:
        handles.append(modules[name].register_forward_hook(
            lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(getattr(out, "shape", ())))))
    trace_blank(model, input_size, handles)          # an input too small for the model: a ValueError saying so
    silent = [name for name in layers if name not in shapes]
    if silent:
        raise ValueError(f"layer {silent[0]!r} does not run in the model's forward pass in eval mode (an auxiliary "
                         f"head?): it has no units to study")
    flat = [name for name in layers if len(shapes[name]) != 4]
    if flat:
        raise ValueError(f"layer {flat[0]!r} puts out a {len(shapes[flat[0]])}-D tensor, not a map of channels "
                         f"[N, C, H, W]: units are channels of convolutional layers or blocks")
    return {name: int(shapes[name][1]) for name in layers}


def _rng(seed: int, *parts) -> random.Random:
    return random.Random(stable_int(":".join(map(str, (seed, *parts)))))


def sample_units(channels: dict[str, int], *, sampling: str = "per-layer", per_layer: int = 8,
                 seed: int = 0) -> list[Unit]:
    """A seeded, sorted unit sample over ``channels`` (layer → channel count)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {list(SAMPLINGS)}")
    if sampling == "all":
        return [Unit(layer, u) for layer, n in channels.items() for u in range(n)]
    if sampling == "per-layer":
        return sorted(Unit(layer, u) for layer, n in channels.items()
                      for u in _rng(seed, "units", layer).sample(range(n), min(per_layer, n)))
    wanted = min(per_layer * len(channels), sum(channels.values()))
    rng, chosen = _rng(seed, "imi"), set()
    layers = list(channels)
    while len(chosen) < wanted:
        layer = rng.choice(layers)
        chosen.add(Unit(layer, rng.randrange(channels[layer])))
    return sorted(chosen)


def sample_among(units: list[Unit], n: int, seed: int = 0) -> list[Unit]:
    """A seeded, sorted sample of ``n`` of ``units``, spread as evenly over their layers as they allow:
    the layers take turns, each drawing from its own seeded order of its units."""
    pools = {layer: _rng(seed, "subsample", layer).sample(sorted(u for u in units if u.layer == layer),
                                                           sum(u.layer == layer for u in units))
             for layer in sorted({u.layer for u in units})}
    chosen: list[Unit] = []
    while len(chosen) < n and any(pools.values()):
        for layer in pools:
            if pools[layer] and len(chosen) < n:
                chosen.append(pools[layer].pop(0))
    return sorted(chosen)


def resolve_units(model: nn.Module, *, layers: list[str], explicit: list[str] = (), sampling: str = "per-layer",
                  per_layer: int = 8, seed: int = 0, input_size: int = 64) -> list[Unit]:
    """The study's units: explicit strings if given (checked against the model), else a seeded sample."""
    if explicit:
        units = sorted({u for text in explicit for u in parse_units(text)})
        channels = layer_channels(model, sorted({u.layer for u in units}), input_size)
        bad = [u for u in units if u.unit >= channels[u.layer]]
        if bad:
            raise ValueError(f"unit {bad[0]} is out of range: {bad[0].layer} has {channels[bad[0].layer]} channels")
        return units
    return sample_units(layer_channels(model, layers, input_size), sampling=sampling, per_layer=per_layer, seed=seed)
