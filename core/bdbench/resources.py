"""Attack and defense resources made by code and cached: clean surrogate models, triggers, encoders.

Nothing is downloaded or shipped. A plugin that needs a resource (LF's perturbation, LC's
adversarial images, SSBA's encoder, TrojanNN's trigger) builds it once and keeps it under the
run's cache dir with the attacked models' integrity check (safetensors plus a checksummed
sidecar); a corrupted entry is reported in one line and rebuilt.

- :func:`cached` - get or build a named set of tensors keyed by a JSON payload;
- :func:`digest` - a stable fingerprint of an :class:`ImageSet` for such payloads;
- :func:`architecture` - the run's model factory (or a named model plugin's);
- :func:`clean_model` - a clean model of the run's architecture trained with the run's recipe
  on the given data, itself cached;
- :func:`robust_model` - the same, adversarially trained ("fast" FGSM with a random start).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn

from bdbench.components import ImageSet
from bdbench.context import RunContext
from bdbench.errors import CacheError, ParameterError

Tensors = dict[str, torch.Tensor]


def digest(data: ImageSet) -> str:
    """SHA-256 of an image set's pixels and labels."""
    h = hashlib.sha256()
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def key_of(payload: dict[str, Any]) -> str:
    """The cache key of a JSON-able payload (anything ``str`` can render is accepted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached(ctx: RunContext, namespace: str, payload: dict[str, Any],
           build: Callable[[], tuple[Tensors, dict[str, Any]]]) -> tuple[Tensors, dict[str, Any]]:
    """``build()``'s tensors and metadata, from ``<cache>/<namespace>/`` when present and intact.

    ``payload`` must name everything the result depends on (data digest, parameters,
    architecture, recipe). Without a cache dir the resource is built every time. The
    metadata gains ``seconds`` (build time) and ``cached`` (whether it came from the cache).
    """
    from bdbench.cache import TensorCache

    key = key_of({"namespace": namespace, **payload})
    cache = TensorCache(ctx.cache_dir, namespace) if ctx.cache_dir is not None else None
    if cache is not None and cache.has(key):
        try:
            tensors, meta = cache.load(key)
            return tensors, {**meta, "cached": True}
        except CacheError as exc:
            print(f"bdrun: warning: {exc}; rebuilding the {namespace} resource", file=sys.stderr)
            cache.discard(key)
    start = time.perf_counter()
    tensors, meta = build()
    meta = {**meta, "seconds": time.perf_counter() - start}
    if cache is not None:
        cache.save(key, tensors, meta)
    return tensors, {**meta, "cached": False}


def architecture(ctx: RunContext, model: str = "auto") -> tuple[Callable[[], nn.Module], str]:
    """A factory of fresh, untrained models and a name for cache keys.

    ``"auto"``: the run's architecture (``ctx.model_factory``; without one, the preset model
    whose dataset and recipe match the run). Any other value names a model plugin, built with
    its default parameters.
    """
    from bdbench.nn import NormalizedModel
    from bdbench.plugins import make_plugin_manager
    from bdbench.presets import PRESETS

    if model == "auto" and ctx.model_factory is not None:
        factory = ctx.model_factory
        with torch.random.fork_rng(devices=[]):
            return factory, "run:" + hashlib.sha256(repr(factory()).encode()).hexdigest()[:16]
    name, params = model, {}
    if name == "auto":
        for p in PRESETS.values():
            rec = attrs.evolve(p.recipe, hflip=p.recipe.hflip and ctx.dataset.hflip)
            if p.dataset == ctx.dataset.name and rec == ctx.recipe:
                name, params = p.model, dict(p.model_params)
                break
        else:
            raise ParameterError("this component needs the victim's architecture for a clean model: "
                                 "give its parameter model=NAME")
    builder = make_plugin_manager(strict=False).create("model", name, params)
    info = ctx.dataset
    return (lambda: NormalizedModel(builder.build(info.num_classes, info.image_shape), info.mean, info.std),
            f"{name}:{json.dumps(params, sort_keys=True)}")


def clean_model(ctx: RunContext, data: ImageSet, *, seed: int = 0, model: str = "auto",
                recipe: Any = None, description: str = "clean model") -> nn.Module:
    """A model of the run's architecture trained on clean ``data`` (eval mode), cached.

    ``seed`` fixes initialisation and shuffling; ``recipe`` defaults to the run's
    (``ctx.recipe``). One entry per (data, architecture, recipe, seed): LF, LC and TrojanNN
    runs on one dataset and model share it.
    """
    return _trained_model(ctx, data, seed=seed, model=model, recipe=recipe, description=description,
                          namespace="clean-models", extra={}, loss_fn=None)


def robust_model(ctx: RunContext, data: ImageSet, *, eps: float, seed: int = 0, model: str = "auto",
                 recipe: Any = None, description: str = "robust model") -> nn.Module:
    """A model of the run's architecture adversarially trained on ``data`` (eval mode), cached.

    "Fast" adversarial training (Wong, Rice, Kolter, "Fast is better than free", ICLR 2020,
    arXiv:2001.03994): every training batch is replaced by its FGSM examples taken from a
    uniform random start in the L-inf ball of radius ``eps`` (pixel scale [0, 1]) with step
    1.25 ``eps`` (:func:`bdbench.adversarial.pgd`, one step), then the usual cross-entropy
    step; the recipe is ``recipe`` or the run's. Cached like :func:`clean_model`, keyed also by
    ``eps`` (namespace ``robust-models``). For attacks whose perturbations should carry
    features of the other classes (LC's "hard" images).
    """
    from bdbench.adversarial import pgd
    from bdbench.training import cross_entropy

    generator = torch.Generator().manual_seed(seed)

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = pgd(net, x, y, eps=eps, step_size=1.25 * eps, steps=1, random_start=True, generator=generator)
        return cross_entropy(net, x_adv, y)

    return _trained_model(ctx, data, seed=seed, model=model, recipe=recipe, description=description,
                          namespace="robust-models", extra={"eps": eps, "method": "fgsm-random-start"},
                          loss_fn=loss_fn)


def _trained_model(ctx: RunContext, data: ImageSet, *, seed: int, model: str, recipe: Any, description: str,
                   namespace: str, extra: dict[str, Any], loss_fn: Callable[..., torch.Tensor] | None) -> nn.Module:
    from bdbench.training import Recipe, fit

    recipe = recipe if recipe is not None else (ctx.recipe if ctx.recipe is not None else Recipe())
    factory, arch = architecture(ctx, model)

    def build() -> tuple[Tensors, dict[str, Any]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = factory().to(ctx.device)
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        fit(net, data, recipe, attrs.evolve(ctx, seed=seed), description=description, **kwargs)
        return dict(net.state_dict()), {"arch": arch}

    payload = {"data": digest(data), "arch": arch, "recipe": attrs.asdict(recipe), "seed": seed,
               "dataset": attrs.asdict(ctx.dataset), **extra}
    state, _ = cached(ctx, namespace, payload, build)
    with torch.random.fork_rng(devices=[]):
        net = factory().to(ctx.device)
    net.load_state_dict(state)
    return net.eval()
