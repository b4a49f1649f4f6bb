"""TrojanNN: a trigger optimised to excite selected internal neurons of a clean model, then retraining.

Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, "Trojaning Attack on Neural Networks", NDSS 2018 (no
arXiv version); reference code PurduePAML/TrojanNN, ports in BackdoorBench ``attack/trojannn.py``
and TrojanZoo ``trojannn.py``.

Given a trained (clean) model f, the attack

1. **selects neurons** in an internal layer l: score_i = sum_j |W^(l+1)_{j,i}|, the total
   absolute weight from neuron i to the next layer (for a conv layer also summed over the
   kernel); the top ``neurons`` are kept (section 4, "internal neuron selection");
2. **generates the trigger** inside a fixed mask M (a corner square here), the outside black:

       t* = argmin_t  sum_i (a_i(M * t) - v*)^2 ,   t in [0, 1]

   with a_i the activation of selected neuron i (a channel's spatial mean for conv layers) and
   v* the target value (section 4, "trojan trigger generation", Algorithm 1), by projected
   sign-gradient steps of ``step_size`` on the pixels inside M;
3. **retrains** the model on data carrying the trigger: round(rho * N) training images drawn
   from all classes get x' = (1 - alpha M) x + alpha M t* and the target label (all-to-one) or
   y + 1 mod K (all-to-all); the original model is retrained on them together with the clean
   rest (section 4, "retraining model"; the paper retrains the layers after l).

The clean model is the core's cached :func:`bdbench.resources.clean_model` (the run's
architecture and recipe); the trigger is a resource cached under ``<cache>/trojannn/``
(checksummed safetensors) keyed by the data digest, architecture, recipe, clean-model seed and
the generation parameters.

Fidelity notes:
- Threat model: the paper modifies a model the attacker was given; here the "given" model is
  a clean model of the run's architecture trained on the attack's training set, and the attack
  is a training-control attack that retrains *that* model (``retrain="fine-tune"``). This avoids
  BackdoorBench's defect of generating the trigger on one model and then training a fresh one,
  on which the selected neurons mean nothing; BackdoorBench's behaviour is
  ``retrain="scratch"`` (and then ``retrain_layers`` is ignored: the whole fresh model trains).
- Retraining data: the paper reverse-engineers one input per class from the model because it
  assumes no access to training data; as BackdoorBench and TrojanZoo, the attack's training set
  is used instead (dirty-label poisoning at the run's ratio).
- Retrained layers: the whole model by default (``retrain_layers="all"``: TrojanZoo fine-tunes
  everything, BackdoorBench trains everything). The paper's choice, ``"after"``, trains only the
  modules the forward pass calls after layer l (for the default layer, the linear head), the
  frozen part kept in eval mode so its BatchNorm statistics do not move. On the smoke preset
  it fails (seed 0: ACC 0.833, ASR 0.093): after global average pooling an 8x8-at-32 (7x7 px)
  patch on a black background moves the selected pooled units little (0.46 -> 0.68 on
  average for the first, the second is dead on black), far from the paper's face model,
  whose fully connected FC6 units see the whole image.
- Layer: ``"head"`` is the input of the final linear layer (BackdoorBench ``linear``, TrojanZoo
  ``flatten``: the pooled features); any module name of the model is accepted, whose "next
  layer" is the first Conv2d or Linear the forward pass calls after it with matching input
  channels (in a pre-activation block that may be the 1x1 shortcut).
- Trigger optimisation: the core's :func:`bdbench.adversarial.perturb` (sign steps of 0.1,
  1,000 steps: BackdoorBench), starting from a white mask (BackdoorBench's mask image), with
  pixels free in [0, 1] (the paper; BackdoorBench keeps them within 0.3 of the start, ``eps``
  sets that). The paper's denoising term and the 1e-3 early stop are not implemented.
- Mask: a bottom-right square of side round(8 H / 32) (8 px at 32x32: 6.3% of the image,
  about BackdoorBench's apple mask, 7%, and the paper's 7% square); the apple and watermark
  shapes are not offered. The trigger replaces the pixels (the paper; ``alpha`` < 1 blends as
  its transparency experiments); BackdoorBench's additive, uint8-wrapping stamp is not copied.
- The model sees the trigger through its own normalisation (BackdoorBench feeds unnormalised
  images to a model trained on normalised ones: not copied).
- Fine-tuning: lr 0.01 (TrojanZoo's examples), for the run's recipe's epochs by default.
  The clean model uses the run's seed (``surrogate_seed`` unset): each seed attacks its own
  pretrained model.
- Measured on the smoke preset (10% dirty label, target 0; seeds 0, 1, 2), defaults:
  ACC 0.858 / 0.857 / 0.856, ASR 0.993 / 0.991 / 0.999 (RA 0.006 / 0.008 / 0.001).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import attrs
import torch
from torch import nn

from bdbench import Attack, Paper, hookimpl
from bdbench import resources
from bdbench.adversarial import perturb
from bdbench.components import ImageSet, PoisonedSet
from bdbench.errors import ParameterError
from bdbench.nn import capture, classifier, dry_run
from bdbench.params import fraction, non_negative, param, positive, unit_interval
from bdbench.training import cross_entropy, fit
from bdbench.triggers import corner_box, corner_patch, stamp

Activations = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, x) -> N x units


@attrs.frozen
class Layer:
    """Layer l: how to read its units' activations, their outgoing weights, what follows it."""

    activations: Activations
    outgoing: torch.Tensor  # units x ... : the next layer's weights, grouped by input unit
    after: list[nn.Module]  # modules the forward pass calls after l (retrained with "after")


def find_layer(model: nn.Module, name: str, input_shape: tuple[int, int, int]) -> Layer:
    """Layer ``name`` of ``model``: ``"head"`` (the linear head's input) or a module name."""
    if name == "head":
        head = classifier(model)
        return Layer(lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                     head.weight.detach().t(), [head])
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        known = [n for n in modules if n][:12]
        raise ParameterError(f"trojannn: the model has no layer {name!r} "
                             f"(use 'head' or one of {', '.join(known)}, ...)")
    target = modules[name]
    events: list[tuple[nn.Module, torch.Tensor | None]] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda mod, i, o: events.append((mod, o))) for m in {*leaves, target}]
    try:
        dry_run(model, input_shape)
    finally:
        for h in hooks:
            h.remove()
    position = next(k for k, (m, _) in enumerate(events) if m is target)
    units = events[position][1].shape[1]
    follow = None
    for m, _ in events[position + 1:]:
        if ((isinstance(m, nn.Conv2d) and m.in_channels == units)
                or (isinstance(m, nn.Linear) and m.in_features == units)):
            follow = m
            break
    if follow is None:
        raise ParameterError(f"trojannn: no Conv2d or Linear layer reads layer {name!r}'s {units} units")
    weight = follow.weight.detach()
    outgoing = weight.transpose(0, 1) if weight.dim() > 1 else weight

    def activations(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with capture({"l": dict(m.named_modules())[name]}) as out:
            m(x)
        a = out["l"]
        return a.flatten(2).mean(2) if a.dim() > 2 else a

    seen, after = {id(target)}, []
    for m, _ in events[position + 1:]:
        if id(m) not in seen:
            seen.add(id(m))
            after.append(m)
    return Layer(activations, outgoing, after)


def select_neurons(outgoing: torch.Tensor, k: int) -> torch.Tensor:
    """Step 1: the k units with the largest total absolute outgoing weight."""
    score = outgoing.abs().flatten(1).sum(1)
    if k > len(score):
        raise ParameterError(f"trojannn: {k} neurons asked for, the layer has {len(score)}")
    return score.topk(k).indices.sort().values


class TrojanNN(Attack):
    """TrojanNN: a mask trigger optimised to excite selected neurons, then retraining."""

    name = "trojannn"
    threat_model = "training-control"
    paper = Paper(title="Trojaning Attack on Neural Networks", venue="NDSS", year=2018,
                  url="https://www.ndss-symposium.org/wp-content/uploads/2018/02/ndss2018_03A-5_Liu_paper.pdf")

    @attrs.frozen(kw_only=True)
    class Config:
        label_mode: Literal["all-to-one", "all-to-all"] = param(
            "all-to-one", source="paper section 4 (one target); BackdoorBench all2one default")
        layer: str = param("head", source="BackdoorBench config/attack/trojannn (layer 'linear': the head's input); "
                                          "TrojanZoo 'flatten'", help="'head' or a module name of the model")
        neurons: int = param(2, source="BackdoorBench and TrojanZoo (2 neurons)", check=positive)
        target_value: float = param(100.0, source="BackdoorBench and TrojanZoo (target activation 100)",
                                    check=positive)
        mask_size: int = param(8, source="ours: 8x8 at 32x32 (6.3%), about the paper's 7% square and "
                                         "BackdoorBench's apple4.png mask (7%); scaled to the image", check=positive)
        init: float = param(1.0, source="BackdoorBench: optimisation starts from the (white) mask image",
                            check=unit_interval)
        eps: float = param(1.0, source="paper: trigger pixels bounded by the valid range only (BackdoorBench 0.3)",
                           check=fraction)
        step_size: float = param(0.1, source="BackdoorBench (sign step 0.1)", check=positive)
        steps: int = param(1000, source="BackdoorBench and TrojanZoo (1,000 iterations)", check=positive)
        alpha: float = param(1.0, source="paper: the trigger replaces the masked pixels (transparency < 1 blends)",
                             check=fraction)
        retrain: Literal["fine-tune", "scratch"] = param(
            "fine-tune", source="paper section 4 and TrojanZoo retrain the original model; 'scratch': BackdoorBench")
        retrain_layers: Literal["all", "after"] = param(
            "all", source="TrojanZoo (fine-tunes the whole model) and BackdoorBench (trains all of it); 'after': "
                          "paper section 4, the layers after the selected layer (fails on the smoke preset)")
        lr: float = param(0.01, source="TrojanZoo examples (fine-tuning lr 0.01)", check=positive)
        epochs: int | None = param(None, source="default: the run's recipe (TrojanZoo examples: 10)", check=positive)
        surrogate_seed: int | None = param(None, source="default: the run's seed (the pretrained model the "
                                                        "attacker receives)", check=non_negative)
        model: str = param("auto", source="the run's architecture (retraining needs the victim's)")

    def __init__(self, config=None) -> None:
        super().__init__(config)
        if self.config.retrain == "fine-tune" and self.config.model != "auto":
            raise ParameterError("trojannn: retrain=fine-tune retrains the victim itself; model must be 'auto'")
        self._ctx = None
        self.trigger: torch.Tensor | None = None  # C x H x W in [0, 1], zero outside the mask
        self.mask: torch.Tensor | None = None  # 1 x H x W in {0, 1}
        self.neurons: torch.Tensor | None = None
        self.info: dict = {}

    # -- steps 1 and 2: neurons and trigger ------------------------------------------------------
    def generate(self, model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[dict, dict]:
        """Select the neurons of ``model`` and optimise the trigger inside the mask."""
        cfg = self.config
        layer = find_layer(model, cfg.layer, image_shape)
        neurons = select_neurons(layer.outgoing, cfg.neurons).to(next(model.parameters()).device)
        mask, _ = corner_patch(image_shape, cfg.mask_size, 1.0)
        mask = mask.to(next(model.parameters()).device)
        x0 = (cfg.init * mask).expand(1, *image_shape).clone()

        def objective(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            a = layer.activations(m, x * mask)[:, neurons]
            return -((a - cfg.target_value) ** 2).sum()

        model.eval()
        delta = perturb(model, x0, objective, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                        random_start=False)
        trigger = ((x0 + delta) * mask)[0]
        with torch.no_grad():
            reached = layer.activations(model, trigger.unsqueeze(0))[0, neurons]
            start = layer.activations(model, x0)[0, neurons]
        return ({"trigger": trigger.cpu(), "mask": mask.cpu(), "neurons": neurons.cpu()},
                {"activation": reached.tolist(), "activation_start": start.tolist()})

    def _surrogate_seed(self, ctx) -> int:
        return ctx.seed if self.config.surrogate_seed is None else self.config.surrogate_seed

    def prepare(self, dataset, train: ImageSet, ctx) -> None:
        """Steps 1-2 on the clean model (both cached)."""
        cfg = self.config
        self._ctx = ctx
        _, arch = resources.architecture(ctx, cfg.model)
        seed = self._surrogate_seed(ctx)

        def build():
            model = resources.clean_model(ctx, train, seed=seed, model=cfg.model, description="trojannn: clean model")
            tensors, info = self.generate(model, ctx.dataset.image_shape)
            return tensors, {**info, "arch": arch}

        generation = {k: getattr(cfg, k) for k in ("layer", "neurons", "target_value", "mask_size", "init", "eps",
                                                   "step_size", "steps", "model")}
        payload = {"generation": generation, "seed": seed, "arch": arch, "data": resources.digest(train),
                   "dataset": attrs.asdict(ctx.dataset), "recipe": attrs.asdict(ctx.recipe) if ctx.recipe else None}
        tensors, self.info = resources.cached(ctx, "trojannn", payload, build)
        self.trigger, self.mask, self.neurons = tensors["trigger"], tensors["mask"], tensors["neurons"]

    # -- step 3: poisoning and retraining ----------------------------------------------------------
    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.trigger is None:
            raise ParameterError("trojannn: the trigger is made in prepare(); call it first")
        if tuple(images.shape[1:]) != tuple(self.trigger.shape):
            raise ParameterError(f"trojannn: trigger of shape {tuple(self.trigger.shape)} for images of "
                                 f"shape {tuple(images.shape[1:])}")
        return stamp(images, self.config.alpha * self.mask, self.trigger)

    def train(self, model: nn.Module, train: ImageSet, poisoned: PoisonedSet, ctx) -> None:
        """Retrain the clean model (or, with ``retrain="scratch"``, the fresh ``model``) on the poisoned set."""
        cfg = self.config
        recipe = ctx.recipe
        data = poisoned.merge(train)
        if cfg.retrain == "scratch":
            fit(model, data, recipe if cfg.epochs is None else attrs.evolve(recipe, epochs=cfg.epochs), ctx,
                description="training trojannn (from scratch)")
            return
        clean = resources.clean_model(ctx, train, seed=self._surrogate_seed(ctx), model=cfg.model,
                                      description="trojannn: clean model")
        model.load_state_dict(clean.state_dict())
        recipe = attrs.evolve(recipe, lr=cfg.lr, epochs=recipe.epochs if cfg.epochs is None else cfg.epochs)
        if cfg.retrain_layers == "all":
            fit(model, data, recipe, ctx, description="retraining trojannn")
            return
        after = find_layer(model, cfg.layer, ctx.dataset.image_shape).after
        trained = [p for m in after for p in m.parameters(recurse=False)]  # fit() freezes the others
        before = [m for m in model.modules() if not list(m.children()) and m not in after]

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for f in before:  # the layers before l keep their BatchNorm statistics
                f.eval()
            return cross_entropy(m, x, y)

        fit(model, data, recipe, ctx, loss_fn=loss_fn, params=trained,
            description="retraining trojannn (layers after l)")

    def trigger_hint(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        return corner_box(image_shape, self.config.mask_size)


@hookimpl
def register_attacks(register):
    register(TrojanNN)
