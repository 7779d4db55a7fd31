"""Structured pruning by filter relevance: LRP (Yeom et al. 2021) and its baselines under one pipeline.

Every criterion scores each output filter of the prunable convolutions; the scores are scaled per
layer as the criterion's own literature does (``layer_scale``, the reference code of Yeom et al.:
LRP relevance and the filter L1 norm divided by the layer's sum, the Taylor score by the layer's L2
norm (Molchanov et al. 2017), the gradient left raw), ranked globally, and whole filters are
removed in ascending order until the removed weights reach ``rate`` of the convolution weights in
scope — so measured sparsity meets the requested rate for every criterion, as it does for the
unstructured methods.  The ranking then decides how much of each layer goes: for LRP, whose
relevance is conserved from layer to layer, a layer the decision relies on little loses more.  A
layer always keeps at least one filter.  Filters that are already zero (an earlier step of an
iterative schedule) rank first, so masks of successive steps are nested.

The data-driven criteria read the tensor each filter produces at its *site*: the BatchNorm that
follows the conv if there is one (the canonical conv+BN unit), else the conv output.  The output
being explained is the true-class logit (one-hot start), summed over a reference set:

- ``lrp``: Σ_hw |R| with zennit's ``EpsilonPlusFlat`` composite and BatchNorm merged into the conv
  (``ResNetCanonizer`` for torchvision ResNets);
- ``taylor``: |Σ_hw a · ∂y/∂a| per image (first-order Taylor, Molchanov et al. 2017);
- ``gradient``: Σ_hw |∂y/∂a| per image;
- ``weight``: the filter's L1 norm (needs no data).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import magnitude  # noqa: F401  (its methods register first, whichever module is imported first)
from .method_base import PruningError, PruningMethod, check_rate, prunable_layers, register_method
from .models.modes import eval_mode
from .models.layers import unwrap
from .structured import filter_masks, following_batchnorms


#: How a criterion's scores are made comparable across layers before the global ranking.
LAYER_SCALES = {
    "sum": lambda s: s.sum(),                 # each layer's live scores sum to 1
    "l2": lambda s: s.pow(2).sum().sqrt(),    # each layer's live scores have unit L2 norm
    "none": None,                             # raw scores
}


def select_filters_globally(layers: dict[str, nn.Conv2d], scores: dict[str, torch.Tensor],
                            rate: float, layer_scale: str = "sum") -> dict[str, torch.Tensor]:
    """Keep-masks over output filters: lowest scaled scores go first until ``rate`` of the weights.

    ``layer_scale`` (a key of :data:`LAYER_SCALES`) divides each layer's scores by the sum or the L2
    norm of its live filters' scores, or leaves them raw."""
    if layer_scale not in LAYER_SCALES:
        raise ValueError(f"unknown layer_scale {layer_scale!r}; choose from {sorted(LAYER_SCALES)}")
    scale = LAYER_SCALES[layer_scale]
    names = list(layers)
    norm_scores, layer_ids, costs = [], [], []
    for i, name in enumerate(names):
        w = layers[name].weight.detach()
        s = scores[name].detach().double().cpu().clone()
        dead = (w.reshape(w.shape[0], -1).abs().sum(1) == 0).cpu()
        if scale is not None:
            ref = scale(s[~dead]) if (~dead).any() else torch.tensor(0.0, dtype=torch.float64)
            s = s / ref if ref > 0 else torch.zeros_like(s)
        s[dead] = -1.0
        norm_scores.append(s)
        layer_ids.append(torch.full((len(s),), i))
        costs.append(torch.full((len(s),), w[0].numel()))
    flat, ids, cost = torch.cat(norm_scores), torch.cat(layer_ids), torch.cat(costs)
    offsets = torch.tensor([0] + [len(s) for s in norm_scores]).cumsum(0)
    budget = rate * float(cost.sum())
    keep = torch.ones(len(flat), dtype=torch.bool)
    left = [len(s) for s in norm_scores]
    removed = 0.0
    for j in torch.sort(flat, stable=True).indices.tolist():
        if removed >= budget:
            break
        i = int(ids[j])
        if left[i] == 1:
            continue
        keep[j] = False
        left[i] -= 1
        removed += float(cost[j])
    device = next(iter(layers.values())).weight.device
    return {name: keep[offsets[i]:offsets[i + 1]].to(device) for i, name in enumerate(names)}


class FilterCriterion(PruningMethod):
    """Structured pruning with a global ranking of per-filter scores (see the module docstring)."""
    structured = True
    kinds = (nn.Conv2d,)
    needs_data = False
    layer_scale = "sum"       # a key of LAYER_SCALES

    def __init__(self, input_size: int = 64):
        self.input_size = input_size

    def masks(self, model, rate, exclude=(), data=None):
        rate = check_rate(rate)
        layers = prunable_layers(model, exclude, self.kinds)
        if self.needs_data and not data:
            raise PruningError(f"method {self.name!r} scores filters on reference images; pass data=[batches]")
        scores = self.filter_scores(unwrap(model), layers, data)
        keep = select_filters_globally(layers, scores, rate, self.layer_scale)
        return filter_masks(model, layers, keep, self.input_size)

    def filter_scores(self, model: nn.Module, layers: dict[str, nn.Conv2d], data) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@register_method("weight")
class WeightCriterion(FilterCriterion):
    """Baseline: filters ranked globally by their L1 norm (no data)."""
    criterion = "l1-filter-norm (global)"

    def filter_scores(self, model, layers, data):
        return {n: m.weight.detach().abs().flatten(1).sum(1) for n, m in layers.items()}


def _sites(model: nn.Module, layers: dict[str, nn.Conv2d], input_size: int) -> dict[str, nn.Module]:
    """The module whose output stands for each conv's channels: its BatchNorm, or the conv itself."""
    bns = following_batchnorms(model, input_size)
    modules = dict(model.named_modules())
    return {name: modules[bns[name]] if name in bns else conv for name, conv in layers.items()}


class ActivationCriterion(FilterCriterion):
    """Scores from (activation, gradient) pairs at each filter's site over a reference set."""
    needs_data = True

    def composite(self, model: nn.Module):
        """A zennit composite to register while explaining, or None for plain gradients."""
        return None

    def channel_scores(self, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def filter_scores(self, model, layers, data):
        composite = self.composite(model)
        if composite is not None:
            # zennit's canonizers rewrite parameters while registered (BatchNorm merged into the conv, a bias
            # added), and zennit 1.0 leaves them changed afterwards: explain a copy, never the model being pruned
            model = copy.deepcopy(unwrap(model))      # layer names are relative to the unwrapped model
            layers = {name: model.get_submodule(name) for name in layers}
        sites = _sites(model, layers, self.input_size)
        p = next(model.parameters())
        totals = {n: torch.zeros(m.out_channels, dtype=torch.float64, device=p.device) for n, m in layers.items()}
        handles = []
        with eval_mode(model):
            try:
                if composite is not None:
                    composite.register(model)
                for name, site in sites.items():
                    handles.append(site.register_forward_hook(self._capture(name, totals)))
                for batch in data:
                    x = batch.images.to(p.device, p.dtype).requires_grad_(True)
                    y = batch.targets.to(p.device)
                    logits = model(x)
                    logits = logits[0] if isinstance(logits, tuple) else logits
                    model.zero_grad(set_to_none=True)
                    logits.gather(1, y[:, None]).sum().backward()
            finally:
                for h in handles:
                    h.remove()
                if composite is not None:
                    composite.remove()
                model.zero_grad(set_to_none=True)
        return totals

    def _capture(self, name: str, totals: dict[str, torch.Tensor]):
        def hook(module, inputs, output):
            act = output.detach()

            def on_grad(grad):
                totals[name] += self.channel_scores(act, grad.detach()).double()
            output.register_hook(on_grad)
        return hook


@register_method("gradient")
class GradientCriterion(ActivationCriterion):
    """Baseline: filters ranked globally by Σ_hw |∂y/∂a| over the reference images (raw, as Yeom et al.)."""
    criterion = "|dy/da| (global)"
    layer_scale = "none"

    def channel_scores(self, act, grad):
        return grad.abs().sum((0, 2, 3))


@register_method("taylor")
class TaylorCriterion(ActivationCriterion):
    """Baseline: filters ranked globally by the first-order Taylor score |Σ_hw a·∂y/∂a|, each layer
    scaled to unit L2 norm (Molchanov et al. 2017)."""
    criterion = "|a·dy/da| (global, layer L2-normalized)"
    layer_scale = "l2"

    def channel_scores(self, act, grad):
        return (act * grad).sum((2, 3)).abs().sum(0)


def is_torchvision_resnet(model: nn.Module) -> bool:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules())


@register_method("lrp")
class LRPCriterion(ActivationCriterion):
    """Filter relevance Σ_hw |R| under zennit's EpsilonPlusFlat with BatchNorm canonized."""
    criterion = "LRP EpsilonPlusFlat |R| (global)"

    def __init__(self, input_size: int = 64, epsilon: float = 1e-6):
        super().__init__(input_size)
        self.epsilon = epsilon

    def composite(self, model):
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer

        canonizer = ResNetCanonizer() if is_torchvision_resnet(model) else SequentialMergeBatchNorm()
        return EpsilonPlusFlat(epsilon=self.epsilon, canonizers=[canonizer])

    def channel_scores(self, act, grad):
        return grad.abs().sum((0, 2, 3))
