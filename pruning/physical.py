"""Physical removal of masked-out filters (DESIGN §4), so parameters and FLOPs really drop.

Structured masks leave the model's shapes alone: a pruned filter is a row of zeros in the conv
weight and zero γ, β in the BatchNorm after it, so its channel is exactly 0.  ``remove_pruned_filters``
cuts such channels out with Torch-Pruning's dependency graph, which also shrinks the following
BatchNorm, the consumers' input channels and the bookkeeping of ``torch.cat``.  The smaller model
computes exactly what the masked model computed:

* a filter is removed only if its channel is exactly 0 wherever it goes: its BatchNorm has γ and
  β masked (or, without a BatchNorm, the conv has no bias or a masked one);
* a filter whose channel is coupled to other layers' outputs (a ResNet ``conv3``/``downsample``
  feeding a residual add, where the group would also cut output channels of other convs) is left
  in place as masked zeros and counted in ``PhysicalResult.kept_masked``.

The masks still needed afterwards (those coupled filters, unstructured or input-channel parts)
are re-indexed exactly to the new shapes.  ``pruning.models.resize.resize_to_state`` rebuilds the
shapes of a physically pruned checkpoint before its state_dict is loaded.

Assumption (true of the registered CNNs): the operations between a BatchNorm and the consumers
of its output map 0 to 0 (ReLU, pooling, concatenation, flatten, dropout).  ``verify=True``
checks the result on a random input and raises if the output changed.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .masks import masked, masked_params
from .method_base import PruningError
from .models.counting import count_flops, count_params
from .models.modes import module_mode
from .models.layers import unwrap


@dataclass
class PhysicalResult:
    masks: dict[str, torch.Tensor]             # masks still needed by the smaller model (new shapes)
    removed: dict[str, int]                    # conv name -> filters physically removed
    kept_masked: dict[str, int]                # conv name -> fully masked filters left in place
    reasons: dict[str, str]                    # conv name -> why its filters were left masked
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    input_size: int
    notes: list[str] = field(default_factory=list)
    #: module name -> parent channel of each output channel of the smaller model, for every module whose
    #: output lost channels: a unit keeps its identity (stimuli, MIS, dissection) across masked and
    #: physically pruned models
    channel_map: dict[str, list[int]] = field(default_factory=dict)

    @property
    def removed_total(self) -> int:
        return sum(self.removed.values())

    @property
    def kept_masked_total(self) -> int:
        return sum(self.kept_masked.values())

    def summary(self) -> dict:
        """JSON-friendly numbers for meta.json."""
        return {"removed": dict(self.removed), "kept_masked": dict(self.kept_masked),
                "removed_total": self.removed_total, "kept_masked_total": self.kept_masked_total,
                "params_before": self.params_before, "params_after": self.params_after,
                "flops_before": self.flops_before, "flops_after": self.flops_after,
                "input_size": self.input_size}


# ---- helpers ----------------------------------------------------------------------------------
def _dead_filters(mask: torch.Tensor) -> list[int]:
    """Output filters (rows along dim 0) whose weight mask is all False."""
    rows = mask.reshape(mask.shape[0], -1).bool()
    return [int(i) for i in torch.nonzero(~rows.any(dim=1)).flatten()]


def _all_false(masks: dict[str, torch.Tensor], name: str, idxs: list[int]) -> bool:
    """``masks[name]`` exists and is False at every index of ``idxs`` (along dim 0)."""
    m = masks.get(name)
    return m is not None and not bool(m.reshape(m.shape[0], -1).bool()[idxs].any())


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    return []


def _example_input(model: nn.Module, input_size: int, seed: int = 0) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, input_size, input_size, generator=g, dtype=torch.float64).to(p.device, p.dtype)


def _eval_mode(model: nn.Module) -> None:
    model.eval()


def _structure_mode(model: nn.Module) -> None:
    """Training-only paths (auxiliary heads) switched on, BatchNorm statistics and dropout frozen."""
    model.train()
    for m in model.modules():
        if isinstance(m, (_BatchNorm, nn.modules.dropout._DropoutNd)):
            m.eval()


def _trace(tp, model: nn.Module, x: torch.Tensor, mode):
    """Torch-Pruning's dependency graph, traced with ``model`` in ``mode``.

    (Torch-Pruning's own tracer calls ``model.eval()`` and leaves it so; ``mode`` is applied again
    inside the forward function it calls.)
    """
    def forward(m, inputs):
        mode(m)
        return m(inputs)

    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=forward, verbose=False)


def _untraced(model: nn.Module, graph) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm)) and m not in graph.module2node]


class _Index:
    """Original indices still present along the channel dims of conv / linear / BatchNorm layers."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.out: dict[str, list[int]] = {}
        self.inp: dict[str, list[int]] = {}
        for n, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                self.out[n], self.inp[n] = list(range(m.weight.shape[0])), list(range(m.weight.shape[1]))
            elif isinstance(m, nn.Linear):
                self.out[n], self.inp[n] = list(range(m.out_features)), list(range(m.in_features))
            elif isinstance(m, _BatchNorm):
                self.out[n] = list(range(m.num_features))

    def drop(self, table: dict[str, list[int]], name: str, idxs) -> None:
        gone = set(int(i) for i in idxs)
        table[name] = [orig for pos, orig in enumerate(table[name]) if pos not in gone]


def _param_dims(module: nn.Module, attr: str) -> tuple[str | None, str | None]:
    """Which index table (``out`` / ``inp``) each dim (0, 1) of ``module.<attr>`` follows."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return ("out", "inp") if attr == "weight" else ("out", None)
    if isinstance(module, _BatchNorm):
        return ("out", None)
    return (None, None)


# ---- the removal ------------------------------------------------------------------------------
def remove_pruned_filters(model: nn.Module, masks: dict[str, torch.Tensor], input_size: int = 64,
                          verify: bool = True) -> PhysicalResult:
    """Physically remove, in place, the conv output filters that ``masks`` prune entirely.

    Returns the masks the smaller model still needs (re-indexed to its shapes), per-layer counts
    of removed filters and of fully masked filters left in place (coupled, or whose channel is not
    exactly zero), and parameters / FLOPs before and after.  The model's unmasked values are not
    changed; apply the returned masks (``pruning.masks``) as before.

    Raises ``PruningError`` if a mask prunes every filter of a conv, or (``verify``) if the smaller
    model does not compute what the masked model computed on a random input.
    """
    import torch_pruning as tp

    model = unwrap(model)
    params = masked_params(model, masks)  # unknown names / wrong shapes raise here, before any change
    masks = {k: v.detach().bool().to(params[k].device) for k, v in masks.items()}
    candidates = _removal_candidates(model, masks)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    params_before = count_params(model)[0]
    flops_before = count_flops(model, input_size, device=next(model.parameters()).device)
    notes: list[str] = []
    try:
        with module_mode(model, training=model.training):     # whatever the surgery sets, the flags come back
            surgery, new_masks, channel_map = _remove_and_check(tp, model, masks, candidates, input_size, verify,
                                                                notes)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))

    if surgery.removed:
        model.physically_pruned = True
    if surgery.kept:
        notes.append(f"{sum(surgery.kept.values())} fully masked filters in {len(surgery.kept)} layers "
                     f"stay as masked zeros")
    return PhysicalResult(new_masks, surgery.removed, surgery.kept, surgery.reasons, params_before,
                          count_params(model)[0], flops_before,
                          count_flops(model, input_size, device=next(model.parameters()).device),
                          input_size, notes, channel_map)


def _removal_candidates(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Conv name -> its fully masked filters; refuses, before any change, a conv masked entirely."""
    candidates: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        key = f"{name}.weight"
        if isinstance(m, nn.Conv2d) and key in masks:
            dead = _dead_filters(masks[key])
            if len(dead) == m.weight.shape[0]:
                raise PruningError(f"the mask of {name} prunes all {len(dead)} of its filters; "
                                   f"removing them would disconnect the network: lower the rate or exclude {name}")
            if dead:
                candidates[name] = dead
    return candidates


def _remove_and_check(tp, model: nn.Module, masks: dict[str, torch.Tensor], candidates: dict[str, list[int]],
                      input_size: int, verify: bool, notes: list[str]):
    """Cut every candidate conv; return the surgery, the re-indexed masks and the channel map.

    The masked model's outputs on a random input are recorded first; with ``verify`` the smaller
    model must reproduce them.
    """
    x = _example_input(model, input_size)
    graph, mode = _traced_graph(tp, model, x[:1], notes)
    surgery = _Surgery(tp, graph, model, masks)
    mode(model)
    with torch.no_grad(), ieee_fp32(), masked(model, masks), _module_outputs(model) as before:
        reference = [t.detach().clone() for t in _flatten_outputs(model(x))]
    numbering = _Numbering(model, surgery.index)
    parent_tags = numbering.tagged_outputs(model, None, x, mode)
    modules = dict(model.named_modules())
    for name, dead in candidates.items():
        surgery.cut(name, modules[name], dead)
    new_masks = _reindex(model, masks, surgery.index)
    mode(model)
    with torch.no_grad(), ieee_fp32(), masked(model, new_masks), _module_outputs(model) as after:
        outputs = _flatten_outputs(model(x))
    if verify:
        _compare(reference, outputs)
    child_tags = numbering.tagged_outputs(model, surgery.index, x, mode)
    channel_map = {}
    for name, out in after.items():
        if name in before and out.shape[1] != before[name].shape[1]:
            if name in surgery.index.out:        # a conv or BatchNorm: its own bookkeeping
                channel_map[name] = list(surgery.index.out[name])
                continue
            channel_map[name] = numbering.match(parent_tags.get(name), child_tags.get(name))
            if channel_map[name] is None:
                notes.append(f"{name}: channels matched by their activations on a random input (a unit silent "
                             f"on it may take a removed neighbour's index)")
                channel_map[name] = _match_channels(before[name], out, name)
    return surgery, new_masks, channel_map


def _traced_graph(tp, model: nn.Module, x: torch.Tensor, notes: list[str]):
    """The dependency graph and the mode it was traced in (training paths too if eval misses layers)."""
    mode = _eval_mode
    graph = _trace(tp, model, x, mode)
    untraced = _untraced(model, graph)
    if untraced:  # e.g. GoogLeNet's aux heads run only in training: trace that path too
        mode = _structure_mode
        graph = _trace(tp, model, x, mode)
        untraced = _untraced(model, graph)
        if untraced:
            notes.append(f"layers not reached by a forward pass keep their shapes: {untraced[:8]}")
    return graph, mode


class _Surgery:
    """Cuts masked filters conv by conv through one dependency graph and keeps the index tables current.

    ``removed``: conv name -> filters cut; ``kept`` / ``reasons``: filters left as masked zeros, and why.
    """

    def __init__(self, tp, graph, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.tp, self.graph, self.masks = tp, graph, masks
        self.index = _Index(model)
        self.removed: dict[str, int] = {}
        self.kept: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def cut(self, name: str, conv: nn.Conv2d, dead: list[int]) -> None:
        """Remove the ``dead`` filters of ``name`` that can go; record the others as kept."""
        group, dead = self._cuttable_group(name, conv, dead)
        if group is None:
            return
        if not self.graph.check_pruning_group(group):
            raise PruningError(f"removing {len(dead)} filters of {name} would empty a coupled layer "
                               f"(layers handled before it were already cut in place)")
        index = self.index
        changes = [(index.names[dep.target.module], dep, idxs) for dep, idxs in group.items
                   if isinstance(dep.target.module, (nn.Conv2d, nn.Linear, _BatchNorm))]
        group.prune()
        for mod_name, dep, idxs in changes:
            module = dep.target.module
            if isinstance(module, _BatchNorm) or self.graph.is_out_channel_pruning_fn(dep.handler):
                index.drop(index.out, mod_name, idxs)
            else:
                index.drop(index.inp, mod_name, idxs)
        self.removed[name] = len(dead)

    def _cuttable_group(self, name: str, conv: nn.Conv2d, dead: list[int]):
        """The group that cuts those ``dead`` filters whose channel is exactly zero, and those filters;
        the group is None when none can be cut."""
        why = _uncuttable(self.graph, conv)
        if why is None:
            group = self._group(conv, name, dead)
            why, alive = _check_group(self.graph, group, conv, name, self.index, self.masks)
            if why is None and alive:
                dead = [i for i in dead if i not in alive]
                self._keep(name, len(alive), "channel not exactly zero (BatchNorm γ/β or bias not masked)")
                if not dead:
                    return None, dead
                group = self._group(conv, name, dead)
                why, _ = _check_group(self.graph, group, conv, name, self.index, self.masks)
        if why is not None:
            self._keep(name, len(dead), why)
            return None, dead
        return group, dead

    def _group(self, conv: nn.Conv2d, name: str, dead: list[int]):
        positions = [self.index.out[name].index(i) for i in dead]
        return self.graph.get_pruning_group(conv, self.tp.prune_conv_out_channels, positions)

    def _keep(self, name: str, count: int, why: str) -> None:
        self.kept[name] = self.kept.get(name, 0) + count
        self.reasons[name] = why


@contextmanager
def ieee_fp32():
    """Convolutions and matrix products in full fp32 inside, TF32 as it was outside.

    On a GPU cuDNN convolutions default to TF32 (10-bit mantissa), which rounds the masked and the
    smaller model differently by more than the comparison of the two allows."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                         deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@contextmanager
def _module_outputs(model: nn.Module):
    """``{module name: its [N, C, ...] output}`` of one forward pass (first call of each module)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and name not in seen:
                seen[name] = out.detach().clone()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class _Numbering:
    """Every conv / BatchNorm output channel of the parent numbered, to name channels by what they are, not by
    what they compute on a probe input (a live unit may be silent on it, like a removed one).

    A tagged copy of a model has every conv weight and BatchNorm γ zero and each channel's bias (BatchNorm β,
    a conv's own) set to a value unique to its parent channel in (1, 2): a channel then carries a positive
    constant that names it through ReLU, pooling, concatenation and residual sums, whatever the input.  The
    parent and the smaller model, tagged alike, compute the same thing at every kept channel.  A conv or
    BatchNorm output needs none of this: the surgery's own index names its channels.
    """

    def __init__(self, model: nn.Module, index: _Index):
        self.offsets, total = {}, 0
        for name, module in model.named_modules():
            if name in index.out and isinstance(module, (nn.Conv2d, _BatchNorm)) and module.bias is not None:
                self.offsets[name] = total
                total += len(index.out[name])
        self.step = 1.0 / (total + 2)

    def tagged_outputs(self, model: nn.Module, index: _Index | None, x: torch.Tensor, mode) -> dict[str, torch.Tensor]:
        """``{module: output}`` of a tagged copy of ``model``; ``index`` (None: the parent itself) gives each
        channel's parent index."""
        tagged = copy.deepcopy(model)
        with torch.no_grad():
            for name, module in tagged.named_modules():
                if not isinstance(module, (nn.Conv2d, _BatchNorm)):
                    continue
                if module.weight is not None:
                    module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                if name in self.offsets:
                    parents = torch.tensor(index.out[name] if index is not None else range(module.bias.shape[0]),
                                           dtype=torch.float64)
                    module.bias.copy_((1.0 + (self.offsets[name] + parents + 1) * self.step).to(module.bias.dtype))
        mode(tagged)
        with torch.no_grad(), ieee_fp32(), _module_outputs(tagged) as outputs:
            tagged(x)
        return outputs

    def match(self, parent: torch.Tensor | None, child: torch.Tensor | None) -> list[int] | None:
        """The parent channel of each child channel from tagged outputs, or None where the tags do not tell
        (a layer no tagged channel reaches, such as a bias-free conv's own output)."""
        if parent is None or child is None or parent.dim() < 2 or child.dim() < 2:
            return None
        p = parent.transpose(0, 1).reshape(parent.shape[1], -1).double()
        q = child.transpose(0, 1).reshape(child.shape[1], -1).double()
        close = torch.stack([(p - row).abs().amax(dim=1) <= self.step / 4 for row in q])   # tags lie `step` apart
        if not bool((close.sum(dim=1) == 1).all()) or not bool((close.sum(dim=0) <= 1).all()):
            return None
        mapping = [int(i) for i in close.float().argmax(dim=1)]
        return mapping if all(a < b for a, b in zip(mapping, mapping[1:])) else None


def _match_channels(parent: torch.Tensor, child: torch.Tensor, name: str) -> list[int]:
    """The parent channel of each child channel: the increasing assignment of identical activations
    (where the tags of :class:`_Numbering` do not tell).

    The smaller model computes exactly what the masked one computed, with channels only removed,
    never reordered, so child channel j is the first parent channel after j − 1's with the same
    values.  (A kept channel that is exactly zero on the probe input could match a removed one; both
    are silent, so such a unit is reported dead or pruned either way.)
    """
    p = parent.transpose(0, 1).reshape(parent.shape[1], -1).double()
    q = child.transpose(0, 1).reshape(child.shape[1], -1).double()
    scale = max(float(p.abs().max()), 1e-12)
    close = torch.cdist(q, p) <= 1e-4 * scale * (p.shape[1] ** 0.5)
    mapping, last = [], -1
    for j in range(q.shape[0]):
        hits = torch.nonzero(close[j, last + 1:]).flatten()
        if len(hits) == 0:
            raise PruningError(f"physical pruning: channel {j} of {name} matches no channel of the masked model")
        last = last + 1 + int(hits[0])
        mapping.append(last)
    return mapping


def _uncuttable(graph, conv: nn.Conv2d) -> str | None:
    """Why the dependency graph cannot cut ``conv``'s filters at all (None if it can try)."""
    if conv not in graph.module2node:
        return "not reached by a forward pass"
    if conv.groups != 1:
        return "grouped convolution"
    return None


def _check_group(graph, group, conv: nn.Conv2d, name: str, index: _Index,
                 masks: dict[str, torch.Tensor]) -> tuple[str | None, set[int]]:
    """Why the group cannot be cut (None if it can), and the root filters whose channel is not zero."""
    alive: set[int] = set()
    has_bn = False
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if module is conv:
            continue
        if isinstance(module, _BatchNorm):
            has_bn = True
            bn = index.names[module]
            orig = [index.out[bn][i] for i in idxs]
            roots = [index.out[name][r] for r in item.root_idxs]
            if not module.affine:
                return f"BatchNorm {bn} without affine parameters keeps the channel non-zero", alive
            for o, r in zip(orig, roots):
                if not (_all_false(masks, f"{bn}.weight", [o]) and _all_false(masks, f"{bn}.bias", [o])):
                    alive.add(r)
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"feeds grouped convolution {index.names[module]}", alive
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if graph.is_out_channel_pruning_fn(dep.handler):
                return f"coupled with the outputs of {index.names[module]} (e.g. a residual add)", alive
            continue
        if isinstance(module, nn.Parameter) or (isinstance(module, nn.Module) and
                                                any(True for _ in module.parameters(recurse=False))):
            return f"coupled with {type(module).__name__} {index.names.get(module, '')}".rstrip(), alive
    if not has_bn and conv.bias is not None:
        orig = [index.out[name][r] for r in group.items[0].root_idxs]
        alive.update(o for o in orig if not _all_false(masks, f"{name}.bias", [o]))
    return None, alive


def _reindex(model: nn.Module, masks: dict[str, torch.Tensor], index: _Index) -> dict[str, torch.Tensor]:
    """Old masks restricted to the kept indices; masks that became all True are dropped."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = {}
    for key, mask in masks.items():
        mod_name, _, attr = key.rpartition(".")
        if key not in params:
            raise PruningError(f"parameter {key} disappeared during physical pruning")
        new = mask
        for dim, table in enumerate(_param_dims(modules[mod_name], attr)):
            if table is None or dim >= new.dim():
                continue
            keep = getattr(index, table)[mod_name]
            if len(keep) != new.shape[dim]:
                new = new.index_select(dim, torch.tensor(keep, dtype=torch.long, device=new.device))
        if new.shape != params[key].shape:
            raise PruningError(f"mask {key} has shape {tuple(new.shape)} after removal, "
                               f"parameter {tuple(params[key].shape)}")
        if not bool(new.all()):
            out[key] = new.contiguous()
    return out


def _compare(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    if len(reference) != len(outputs):
        raise PruningError("physical pruning changed the structure of the model's output")
    for ref, out in zip(reference, outputs):
        if ref.shape != out.shape:
            raise PruningError(f"physical pruning changed an output shape {tuple(ref.shape)} -> {tuple(out.shape)}")
        tight = ref.dtype == torch.float64
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        atol = (1e-9 if tight else 1e-4) * max(scale, 1e-12)
        if not torch.allclose(out, ref, rtol=1e-7 if tight else 1e-3, atol=atol):
            diff = float((out - ref).abs().max())
            raise PruningError(f"physical pruning changed the model's output (max |diff| {diff:.3g}, "
                               f"scale {scale:.3g}); the model was modified in place and is not usable")
