"""Grad-Prune: prune the conv filters with the largest unlearning-loss gradient, then fine-tune.

Dunnett, Arablouei, Miller, Dedeoglu, Jurdak, "Unlearning Backdoor Attacks through Gradient-Based
Model Pruning", arXiv:2405.03918 (2024), section IV. The defender has clean images x_i with
labels y_i and their backdoor variants x~_i (sec. III-C: the trigger oracle):

1. unlearning loss (eq. 2): L = sum_i CE(f'(x~_i, theta'), y_i), backdoor inputs with TRUE labels;
2. per 2D filter i of conv layer l (eq. 3): xi_{l,i} = ||grad_{theta'_{l,i}} L||_1 / l(grad_{theta'_{l,i}});
3. prune the filter with the largest xi (weights and bias set to zero), one per round; after
   each round evaluate the unlearning loss and the clean accuracy on the validation split;
   stop when validation accuracy falls below the threshold alpha or the unlearning loss has
   not improved for P_p consecutive rounds;
4. fine-tune (sec. IV-C) on the clean AND backdoor training data, both with true labels, until
   the validation loss has not improved for P_t epochs.

Fidelity notes:
- alpha: the paper says "until the main task accuracy falls below a predefined threshold alpha"
  and gives no value; the reference code (WhoDunnett/Grad-Prune ``cifar10.yaml``,
  ``accuracy_threshold: 0.1``) uses it as an absolute drop from the unpruned model's validation
  accuracy. We stop when val_acc < acc_0 - ``alpha`` (absolute, not FP's relative drop).
- The model kept after pruning is the round with the lowest validation unlearning loss among
  rounds within the accuracy threshold (the reference's "best"), possibly the unpruned model.
  The validation loss is a mean, not the reference's sum over batches (no effect on the choice).
- Pruned filters stay pruned during fine-tuning (persistent mask, ``bdbench.masking``): the
  paper's intent. The reference zeroes weights without a mask, so fine-tuning regrows them;
  ``regrow=true`` reproduces that. A pruned filter scores 0 and is never picked twice (the
  reference can pick a zeroed filter again).
- "Weights and bias" as the paper says; a conv without bias loses its weights only. The
  reference instead zeroes entry i of the next tensor in ``parameters()`` order, which on
  PreAct-ResNet is the next BN's gamma (architecture-dependent; not copied). xi uses the
  filter's weights only (the reference's 4-D gradients).
- Gradients are taken in eval mode (BN running statistics, nothing updated); the reference
  switches to eval after its first batch, so all but one batch match.
- Fine-tuning: SGD lr 1e-3, momentum 0.9, wd 5e-4, batch 128, constant lr, no augmentation
  (reference yaml; the paper states none). Each step sums CE(f(x), y) + CE(f(x~), y) over the
  pair (reference). The stopping loss is that same objective on the validation split (the paper:
  "we evaluate the loss using a separate validation set"); the reference uses clean CE only.
  The best epoch by validation loss is kept. ``max_epochs`` caps the open-ended loop.
- No test-set evaluation: the reference logs full test metrics every round (its main cost).
"""
from __future__ import annotations

import copy

import attrs
import torch
import torch.nn.functional as F

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult, ImageSet
from bdbench.masking import FilterPruning, filter_scores
from bdbench.params import non_negative, param, positive
from bdbench.training import Recipe, accuracy, batches, fit, make_optimizer

REF = "WhoDunnett/Grad-Prune cifar10.yaml"


class GradPrune(Defense):
    """Grad-Prune: prune filters by unlearning-loss gradient on backdoor inputs, then fine-tune on clean + backdoor."""

    name = "gradprune"
    needs = frozenset({"clean", "trigger_oracle"})
    uses_validation = True
    paper = Paper(title="Unlearning Backdoor Attacks through Gradient-Based Model Pruning",
                  venue="arXiv", year=2024, arxiv="2405.03918")

    @attrs.frozen(kw_only=True)
    class Config:
        alpha: float = param(0.10, source=f"paper sec. IV-B (threshold alpha); value: {REF} accuracy_threshold",
                             help="stop pruning when val accuracy falls below acc_0 - alpha", check=non_negative)
        patience_prune: int = param(10, source=f"paper sec. IV-B (P_p); value: {REF}",
                                    help="P_p: rounds without unlearning-loss improvement", check=positive)
        patience_tune: int = param(10, source=f"paper sec. IV-C (P_t); value: {REF}",
                                   help="P_t: fine-tuning epochs without val-loss improvement", check=positive)
        max_rounds: int | None = param(None, source="bdbench: no cap (the paper stops by alpha or P_p)",
                                       help="cap on pruning rounds", check=positive)
        max_epochs: int = param(200, source="bdbench: cap on the paper's open-ended fine-tuning",
                                help="cap on fine-tuning epochs", check=positive)
        lr: float = param(1e-3, source=REF, check=positive)
        momentum: float = param(0.9, source=REF, check=non_negative)
        weight_decay: float = param(5e-4, source=REF, check=non_negative)
        batch_size: int = param(128, source=REF, check=positive)
        regrow: bool = param(False, source="paper sec. IV-B/C: pruned filters stay pruned (reference regrows)",
                             help="unmask pruned filters before fine-tuning (reference behaviour)")

    def purify(self, model, data, ctx) -> DefenseResult:
        cfg, dev = self.config, ctx.device
        trigger = data.trigger
        bd_train, bd_val = backdoor(data.clean, trigger), backdoor(data.val, trigger)
        filters = FilterPruning(model)

        # Step 1-3: gradient-based pruning, one filter per round.
        acc_0 = accuracy(model, data.val, device=dev)
        best_loss, best_state, best_round = mean_loss(model, bd_val, dev), copy.deepcopy(model.state_dict()), 0
        stale, rounds, history = 0, 0, []
        limit = cfg.max_rounds or sum(c.out_channels for c in filters.convs.values())
        with ctx.reporter.task("gradprune: pruning", limit) as bar:
            while stale < cfg.patience_prune and rounds < limit:
                layer, index, xi = largest_gradient(model, filters, bd_train, cfg.batch_size, dev)
                filters.prune(layer, index)
                rounds += 1
                bar.advance()
                val_acc, val_loss = accuracy(model, data.val, device=dev), mean_loss(model, bd_val, dev)
                history.append({"layer": layer, "filter": index, "xi": xi, "val_acc": val_acc, "val_loss": val_loss})
                if val_acc < acc_0 - cfg.alpha:
                    break
                if val_loss < best_loss:
                    best_loss, best_state, best_round, stale = val_loss, copy.deepcopy(model.state_dict()), rounds, 0
                else:
                    stale += 1
        model.load_state_dict(best_state)  # masks are buffers: restores the pruned set of that round
        pruned = filters.pruned[:best_round]
        filters.pruned = pruned
        if cfg.regrow:
            filters.bake()

        # Step 4: fine-tune on clean + backdoor (true labels) until the validation loss stalls for P_t epochs.
        epochs = fine_tune(model, data.clean, data.val, trigger, cfg, ctx)
        if not cfg.regrow:
            filters.bake()
        model.eval()
        return DefenseResult(model=model, diagnostics={
            "val_acc_initial": acc_0, "rounds": rounds, "pruned": [f"{n}[{i}]" for n, i in pruned],
            "order": [f"{h['layer']}[{h['filter']}]" for h in history],
            "val_unlearning_loss": best_loss, "val_acc_pruned": history[best_round - 1]["val_acc"] if best_round else acc_0,
            "fine_tune_epochs": epochs, "regrow": cfg.regrow,
        })


def backdoor(data: ImageSet, trigger) -> tuple[torch.Tensor, torch.Tensor]:
    """(x~, y): the trigger oracle applied to the defender's images, with their true labels."""
    return trigger(data.float()).clamp(0, 1), data.labels


def mean_loss(model, pairs: tuple[torch.Tensor, torch.Tensor], device) -> float:
    model.eval()
    x, y = pairs
    with torch.no_grad():
        return sum(F.cross_entropy(model(x[i:i + 512].to(device)), y[i:i + 512].to(device), reduction="sum").item()
                   for i in range(0, len(x), 512)) / max(len(x), 1)


def largest_gradient(model, filters: FilterPruning, pairs, batch_size: int, device) -> tuple[str, int, float]:
    """Eq. 2-3: accumulate grad of sum_i CE(f(x~_i), y_i) over the training pairs; argmax of xi_{l,i}."""
    model.eval()
    model.zero_grad(set_to_none=True)
    x, y = pairs
    for i in range(0, len(x), batch_size):
        F.cross_entropy(model(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device), reduction="sum").backward()
    best = max(((name, xi.max().item(), int(xi.argmax())) for name, xi in filter_scores(filters)), key=lambda t: t[1])
    model.zero_grad(set_to_none=True)
    return best[0], best[2], best[1]


def fine_tune(model, clean: ImageSet, val: ImageSet, trigger, cfg, ctx) -> int:
    """Epochs of SGD on CE(f(x), y) + CE(f(x~), y); keep the epoch with the lowest validation loss."""
    recipe = Recipe(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, schedule="constant")

    def paired_loss(m, x, y):
        return F.cross_entropy(m(x), y) + F.cross_entropy(m(trigger(x).clamp(0, 1)), y)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(paired_loss(model, x, y).item() * len(y)
                       for x, y in batches(val, 512, device=ctx.device)) / max(len(val), 1)

    opt = make_optimizer(model.parameters(), recipe)
    best, best_state, stale, epoch = val_loss(), copy.deepcopy(model.state_dict()), 0, 0
    while stale < cfg.patience_tune and epoch < cfg.max_epochs:
        fit(model, clean, recipe, ctx, loss_fn=paired_loss, optimizer=opt, description="gradprune: fine-tuning",
            stream=f"gradprune-tune-{epoch}")
        epoch += 1
        loss = val_loss()
        if loss < best:
            best, best_state, stale = loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
    model.load_state_dict(best_state)
    return epoch


@hookimpl
def register_defenses(register):
    register(GradPrune)
