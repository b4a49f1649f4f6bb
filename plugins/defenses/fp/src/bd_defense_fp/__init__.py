"""FP: Fine-Pruning, prune dormant channels of the last convolutional layer, then fine-tune.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, arXiv:1805.12185, section 4 (pruning defense, then fine-pruning):

1. a_j = (1/n) sum_x h_j(x): the mean activation of channel j of the last convolutional
   layer over the defender's clean data;
2. prune channels in increasing order of a_j (dormant first); after each step measure the
   accuracy on the validation split and stop before the step at which it falls by the
   threshold, keeping the last model that satisfied it;
3. fine-tune the pruned network on the clean data with the pruned channels held at zero.

Fidelity notes:
- Stopping rule: relative drop (acc_0 - acc) / acc_0 >= ``acc_ratio`` (0.1), measured on the
  defender's validation split. BackdoorBench measures it on the *test* set (a leak); the
  survey's fork uses the validation split, as we do.
- The model kept is the last one that satisfied the threshold: BackdoorBench keeps an alias
  of the network being pruned and so returns one step too many.
- Steps of ceil(``prune_step`` x channels) (BackdoorBench: 1%); the paper prunes one at a time
  (``prune_step`` small enough gives that).
- "Last convolutional layer" is the feature map the head reads (the model's
  ``forward_features``), found on any architecture. On the small CNN it is post-ReLU, as the
  paper assumes; on PreAct-ResNet18 it is layer4's output, which has no BN/ReLU after it
  (BackdoorBench's choice), so "lowest mean" may pick negative rather than dormant channels.
- Activations are recorded in eval mode on non-augmented clean images.
"""
from __future__ import annotations

import math

import attrs

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.params import param, positive, fraction
from bdbench.pruning import ChannelMask, channel_activations, feature_module
from bdbench.training import FineTuning, accuracy, fit


class FP(Defense):
    """Fine-Pruning: prune the least active last-layer channels until validation accuracy drops, then fine-tune."""

    name = "fp"
    needs = frozenset({"clean"})
    uses_validation = True
    paper = Paper(title="Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
                  venue="RAID", year=2018, arxiv="1805.12185")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        acc_ratio: float = param(0.1, source="BackdoorBench config/defense/fp (acc_ratio); survey fork",
                                 help="stop when validation accuracy falls by this fraction", check=fraction)
        prune_step: float = param(0.01, source="BackdoorBench config/defense/fp (once_prune_ratio)",
                                  help="fraction of channels pruned per step", check=positive)

    def purify(self, model, data, ctx) -> DefenseResult:
        layer_name, layer = feature_module(model, data.image_shape)
        activation = channel_activations(model, layer, data.clean, device=ctx.device)
        order = activation.argsort()  # dormant channels first
        channels = len(order)
        step = max(1, math.ceil(self.config.prune_step * channels))
        mask = ChannelMask(layer, channels)
        acc_0 = accuracy(model, data.val, device=ctx.device)
        kept = 0
        with ctx.reporter.task("fp: pruning", channels) as bar:
            for n in range(step, channels, step):
                mask.prune(order[:n])
                acc = accuracy(model, data.val, device=ctx.device)
                bar.advance(step)
                if (acc_0 - acc) / max(acc_0, 1e-12) >= self.config.acc_ratio:
                    break
                kept = n
        mask.set(mask.mask.new_ones(channels))
        mask.prune(order[:kept])
        acc_pruned = accuracy(model, data.val, device=ctx.device)
        fit(model, data.clean, self.config.recipe(ctx.dataset.hflip), ctx, description="fp: fine-tuning")
        return DefenseResult(model=model, diagnostics={
            "layer": layer_name, "channels": channels, "pruned": kept,
            "val_acc_initial": acc_0, "val_acc_pruned": acc_pruned,
        })


@hookimpl
def register_defenses(register):
    register(FP)
