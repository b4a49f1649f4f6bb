"""Neuron masks and filter pruning, shared by the mask-learning and gradient-pruning defenses.

Two mechanisms, both working on any model through forward hooks or torch's pruning
re-parametrisation, so no network copy or layer replacement is needed:

- :class:`NeuronMasks`: one learnable mask ``m`` per BatchNorm2d channel on the BN scale, and
  optionally multiplicative neuron perturbations ``delta`` (on the scale) and ``xi`` (on the
  shift), as in ANP (Wu & Wang, arXiv:2110.14430, eq. 3)::

      BN_k(x) = gamma_k * (m_k + delta_k) * x_hat_k + beta_k * (1 + xi_k)

  NFT (arXiv:2407.10052) and RNP learn ``m`` alone; ANP adds ``delta, xi`` in ``[-eps, eps]``.
  The hook rewrites the BN output ``y = gamma x_hat + beta`` as ``(m + delta)(y - beta) +
  beta (1 + xi)``, so it is exact in train mode (batch statistics) and eval mode alike. The
  masks live outside the model (``masks.parameters()`` is what an optimizer gets);
  :meth:`NeuronMasks.bake` writes ``gamma * m`` into the model and removes the hooks.
  Pruning neuron ``k`` is ``m_k = 0``: ``gamma_k = 0`` after baking, ``beta_k`` kept (ANP, RNP).
- :class:`WeightMasks`: one learnable soft mask per weight *element* of every Conv2d (or other
  weighted layer type), applied as ``m * theta`` through torch's parametrisation, so the layer
  computes with the masked weights in every forward pass (AWM, Chai & Chen, arXiv:2207.04497,
  masks every conv weight). The masks live outside the model; :meth:`WeightMasks.bake` writes
  ``theta * m`` into the weights and removes the parametrisation.
- :class:`FilterPruning`: a persistent 0/1 mask on the output filters of every Conv2d (weight
  and bias), through ``torch.nn.utils.prune``: a pruned filter's effective weights are zero in
  every forward pass, and its stored weights get zero gradient, so fine-tuning cannot regrow
  it (Grad-Prune, arXiv:2405.03918, sec. IV-B). :meth:`FilterPruning.bake` makes it permanent.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from bdbench.errors import BdbenchError
from bdbench.nn import batchnorms, call_order, example_input, require_batchnorm


class NeuronMasks:
    """Per-channel masks on the scale of every affine BatchNorm2d of ``model`` (in forward order).

    :param perturbations: also keep ANP's multiplicative perturbations ``delta`` (scale) and
        ``xi`` (shift); they act only inside :meth:`perturbed`.
    :param method: the defense's name, for the error on a model without BatchNorm.
    """

    def __init__(self, model: nn.Module, *, input_shape: tuple[int, int, int] | None = None,
                 perturbations: bool = False, method: str = "masking") -> None:
        require_batchnorm(model, method)
        bns = [(n, m) for n, m in batchnorms(model) if m.affine]
        if not bns:
            raise BdbenchError(f"{method} needs affine BatchNorm2d layers, and {type(model).__name__} has none")
        if input_shape is not None:  # forward order, so layer index l is depth (NFT's mu(l))
            order = {id(m): i for i, (_, m) in enumerate(call_order(model, example_input(model, input_shape),
                                                                      (nn.BatchNorm2d,)))}
            bns.sort(key=lambda nm: order.get(id(nm[1]), len(order)))
        self.names = [n for n, _ in bns]
        self.modules = [m for _, m in bns]
        device = self.modules[0].weight.device
        self.masks = [nn.Parameter(torch.ones(m.num_features, device=device)) for m in self.modules]
        self.delta = [torch.zeros(m.num_features, device=device) for m in self.modules] if perturbations else []
        self.xi = [torch.zeros(m.num_features, device=device) for m in self.modules] if perturbations else []
        self._perturbed = False
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    # -- the forward rule -------------------------------------------------------------------------------
    def _hook(self, i: int):
        def hook(module: nn.BatchNorm2d, inputs, y: torch.Tensor) -> torch.Tensor:
            beta = module.bias.view(1, -1, 1, 1)
            scale = self.masks[i]
            shift = beta
            if self._perturbed:
                scale = scale + self.delta[i]
                shift = beta * (1 + self.xi[i].view(1, -1, 1, 1))
            return scale.view(1, -1, 1, 1) * (y - beta) + shift
        return hook

    # -- access -------------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.masks)

    def noise(self) -> list[torch.Tensor]:
        """The perturbation tensors ``delta`` then ``xi`` (empty without perturbations)."""
        return self.delta + self.xi

    def flat(self) -> torch.Tensor:
        """All mask values, concatenated in layer order (a detached copy)."""
        return torch.cat([m.detach() for m in self.masks])

    def __len__(self) -> int:
        return sum(m.numel() for m in self.masks)

    # -- updates -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self, low: float | Sequence[float] = 0.0, high: float = 1.0) -> None:
        """Project every mask into ``[low, high]``; ``low`` may be one value per layer (NFT's mu(l))."""
        lows = [low] * len(self.masks) if isinstance(low, (int, float)) else list(low)
        for m, lo in zip(self.masks, lows, strict=True):
            m.clamp_(lo, high)

    @torch.no_grad()
    def set(self, values: torch.Tensor) -> None:
        """Set every mask from one flat vector (layer order, as :meth:`flat`)."""
        for m, v in zip(self.masks, values.to(self.masks[0].device).split([m.numel() for m in self.masks])):
            m.copy_(v)

    @torch.no_grad()
    def randomize(self, eps: float, generator: torch.Generator | None = None) -> None:
        """Draw ``delta, xi ~ U(-eps, eps)`` and make them require gradients."""
        for t in self.noise():
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1).mul_(eps).to(t))
            t.requires_grad_(True)

    @torch.no_grad()
    def ascend(self, grads: Sequence[torch.Tensor], step: float, eps: float) -> None:
        """One signed ascent step on ``delta, xi``, projected onto ``[-eps, eps]``."""
        for t, g in zip(self.noise(), grads, strict=True):
            t.add_(step * g.sign()).clamp_(-eps, eps)

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[NeuronMasks]:
        """Context in which the forward pass uses ``m + delta`` and ``1 + xi``."""
        if not self.delta:
            raise BdbenchError("these masks were made without perturbations")
        self._perturbed = True
        try:
            yield self
        finally:
            self._perturbed = False

    # -- ending -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bake(self) -> None:
        """Write ``gamma * m`` into each BatchNorm and remove the hooks (perturbations dropped)."""
        for module, m in zip(self.modules, self.masks):
            module.weight.mul_(m.to(module.weight))
        self.remove()

    def remove(self) -> None:
        """Remove the hooks; the model is as it was (masks not applied)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NeuronMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Masked(nn.Module):
    """Parametrisation ``weight = original * mask``; the mask is held outside the module tree
    (a plain list), so it is not one of the model's parameters or state-dict entries."""

    def __init__(self, mask: nn.Parameter) -> None:
        super().__init__()
        self._mask = [mask]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._mask[0].to(weight.dtype)


class WeightMasks:
    """A soft mask ``m`` (initialised to 1) on every weight element of each ``types`` layer.

    The layer computes with ``m * theta`` (the original ``theta`` is kept and untouched); the
    masks are :meth:`parameters` for an optimizer, clipped to ``[0, 1]`` by :meth:`clamp_`.
    Biases, BatchNorm and layers of other types are not masked. :meth:`bake` writes ``theta * m``
    into the weights and removes the parametrisation; :meth:`remove` restores ``theta``.

    :param types: the layer types whose ``weight`` is masked (default: every Conv2d).
    :param exclude: names of layers to leave unmasked.
    """

    def __init__(self, model: nn.Module, *, types: tuple[type, ...] = (nn.Conv2d,),
                 exclude: Sequence[str] = (), method: str = "masking") -> None:
        layers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor) and n not in exclude]
        if not layers:
            raise BdbenchError(f"{method} masks the weights of {', '.join(t.__name__ for t in types)} layers, "
                               f"and {type(model).__name__} has none")
        self.names = [n for n, _ in layers]
        self.modules = [m for _, m in layers]
        self.masks = [nn.Parameter(torch.ones_like(m.weight, memory_format=torch.contiguous_format))
                      for m in self.modules]
        for module, mask in zip(self.modules, self.masks):
            parametrize.register_parametrization(module, "weight", _Masked(mask))
        self._active = True

    def parameters(self) -> list[nn.Parameter]:
        return list(self.masks)

    def flat(self) -> torch.Tensor:
        """All mask values, concatenated in layer order (a detached copy)."""
        return torch.cat([m.detach().flatten() for m in self.masks])

    def l1(self) -> torch.Tensor:
        """``||m||_1`` over every mask (differentiable)."""
        return sum(m.abs().sum() for m in self.masks)

    def __len__(self) -> int:
        return sum(m.numel() for m in self.masks)

    def originals(self) -> list[torch.Tensor]:
        """The unmasked weights ``theta`` of each layer (the tensors the parametrisation keeps)."""
        return [m.parametrizations.weight.original for m in self.modules]

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        for m in self.masks:
            m.clamp_(low, high)

    @torch.no_grad()
    def bake(self) -> None:
        """Write ``theta * m`` into each layer's weight and remove the parametrisation."""
        if self._active:
            for module in self.modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            self._active = False

    def remove(self) -> None:
        """Remove the parametrisation; each layer's weight is ``theta`` again (masks dropped)."""
        if self._active:
            for module in self.modules:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            self._active = False

    def __enter__(self) -> WeightMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def pruning_candidates(scores: torch.Tensor, *, by: str = "threshold", step: float = 0.05,
                       maximum: float = 0.9) -> list[tuple[float, torch.Tensor]]:
    """(value, 0/1 keep-mask) for each grid value 0, step, ..., maximum.

    ``by="threshold"``: units whose score is at most the value are pruned (ANP, RNP);
    ``by="number"``: the value is the fraction of units pruned, lowest scores first.
    """
    grid = [round(i * step, 10) for i in range(int(maximum / step + 1e-9) + 1)]
    return [(v, keep_mask(scores, v, by=by)) for v in grid]


def keep_mask(scores: torch.Tensor, value: float, *, by: str = "threshold") -> torch.Tensor:
    """0/1 mask of the units kept: score > ``value`` (``by="threshold"``), or all but the
    ``floor(value * n)`` lowest scores (``by="number"``)."""
    if by == "threshold":
        return (scores > value).float()
    if by == "number":
        keep = torch.ones_like(scores, dtype=torch.float32)
        keep[scores.argsort()[:int(value * len(scores))]] = 0.0
        return keep
    raise BdbenchError(f"pruning by {by!r}: use 'threshold' or 'number'")


def select_pruning(scores: torch.Tensor, evaluate, *, by: str = "threshold", step: float = 0.05,
                   maximum: float = 0.9, acc_ratio: float = 0.1) -> dict:
    """The most pruning whose accuracy stays within ``acc_ratio`` (relative) of the unpruned one's.

    ``evaluate(keep)`` returns an accuracy (on the defender's validation split) with the 0/1
    ``keep`` mask applied. Sweeps :func:`pruning_candidates` and keeps the largest value whose
    relative drop from ``evaluate(all ones)`` is under ``acc_ratio``. Returns ``{"value", "keep",
    "acc", "acc_0", "sweep": [(value, acc), ...]}``.
    """
    acc_0 = evaluate(torch.ones_like(scores, dtype=torch.float32))
    best = {"value": 0.0, "keep": torch.ones_like(scores, dtype=torch.float32), "acc": acc_0, "acc_0": acc_0}
    sweep = []
    for value, keep in pruning_candidates(scores, by=by, step=step, maximum=maximum):
        acc = evaluate(keep)
        sweep.append((value, acc))
        if (acc_0 - acc) / max(acc_0, 1e-12) < acc_ratio:
            best = {"value": value, "keep": keep, "acc": acc, "acc_0": acc_0}
    best["sweep"] = sweep
    return best


def exponential_schedule(num_layers: int, alpha: float, beta: float) -> list[float]:
    """NFT's mask lower bounds mu(l) = alpha * exp(-beta * l) for layers l = 1..num_layers."""
    return [alpha * math.exp(-beta * l) for l in range(1, num_layers + 1)]


class FilterPruning:
    """A persistent 0/1 mask on the output filters of every Conv2d of ``model`` (weight and bias).

    Uses ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``), so pruned filters
    stay zero while the model trains; :meth:`bake` removes the re-parametrisation.
    """

    def __init__(self, model: nn.Module) -> None:
        self.convs: dict[str, nn.Conv2d] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        if not self.convs:
            raise BdbenchError(f"model {type(model).__name__} has no Conv2d layer")
        for conv in self.convs.values():
            torch_prune.custom_from_mask(conv, "weight", torch.ones_like(conv.weight))
            if conv.bias is not None:
                torch_prune.custom_from_mask(conv, "bias", torch.ones_like(conv.bias))
        self.pruned: list[tuple[str, int]] = []

    def prune(self, name: str, filter: int) -> None:
        """Zero filter ``filter`` of conv ``name`` (its weights and bias), persistently."""
        conv = self.convs[name]
        with torch.no_grad():
            conv.weight_mask[filter] = 0
            conv.weight_orig[filter] = 0
            if conv.bias is not None:
                conv.bias_mask[filter] = 0
                conv.bias_orig[filter] = 0
        self.pruned.append((name, int(filter)))

    def is_pruned(self, name: str) -> torch.Tensor:
        return self.convs[name].weight_mask.flatten(1).amax(1) == 0

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, conv in self.convs.items():
            yield name, conv.weight_orig

    def bake(self) -> None:
        """Make the zeros plain weights and remove the masks (later training may regrow them)."""
        for conv in self.convs.values():
            torch_prune.remove(conv, "weight")
            if conv.bias is not None and hasattr(conv, "bias_orig"):
                torch_prune.remove(conv, "bias")


def filter_scores(pruning: FilterPruning) -> list[tuple[str, torch.Tensor]]:
    """Grad-Prune's xi_{l,i} = ||grad theta_{l,i}||_1 / #entries for every filter of every conv,
    from the gradients accumulated on the stored weights (pruned filters score 0)."""
    out = []
    for name, w in pruning.named_weights():
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        out.append((name, g.detach().abs().flatten(1).mean(1)))
    return out
