"""BNP: prune BatchNorm channels whose stored statistics diverge from clean pre-activations.

Zheng, Tang, Li, Liu, "Pre-activation Distributions Expose Backdoor Neurons", NeurIPS 2022
(OpenReview wwW-1k1ljIg), section 4 (BN-statistics-based pruning):

1. The running statistics (mu_k, sigma_k^2) of every BatchNorm channel k were accumulated on the
   poisoned training set: they describe the pre-activation distribution of clean *and* poisoned
   inputs, N(mu_k, sigma_k^2).
2. The defender measures the clean pre-activation distribution N(mu^_k, sigma^_k^2): the mean and
   variance of the BN's input over its clean data (over samples, height and width).
3. Each channel is scored by the KL divergence between the two Gaussians:
   s_k = KL(N(mu^_k, sigma^_k^2) || N(mu_k, sigma_k^2))
       = log(sigma_k / sigma^_k) + (sigma^_k^2 + (mu^_k - mu_k)^2) / (2 sigma_k^2) - 1/2.
   Backdoor neurons are the ones whose poisoned-data statistics are far from the clean ones.
4. Per BN layer, the threshold is mean(s) + u * std(s); channels above it are pruned.
   No gradient step, no fine-tuning.

Fidelity notes:
- Clean data only: the statistics are accumulated over all the defender's clean samples in eval
  mode, without augmentation. The official code uses one augmented batch of 500 clean images;
  BackdoorBench overwrites the clean statistics with a batch of the *poisoned training set* (its
  collect flag is never reset), a threat-model violation we do not copy.
- The KL uses the ratio of standard deviations (the official code and the paper);
  BackdoorBench and the survey's fork use log(var2/var1), twice that term.
- sigma^2 is the unbiased variance over all N x H x W values (torch's default in the official
  code); the per-layer standard deviation of the scores is unbiased as well.
- Every BatchNorm2d is scored, including BNs fed by a residual sum (the statistic needs only the
  BN's input, as in the official code). A model without BatchNorm fails with a one-line error.
- Pruning sets gamma_k = beta_k = 0 (:func:`bdbench.pruning.prune_batchnorm_channels`, held in the
  state dict), as BackdoorBench and the fork do; the official code zeroes gamma_k only, leaving beta_k.
"""
from __future__ import annotations

import attrs
import torch

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.nn import batchnorms, require_batchnorm
from bdbench.params import non_negative, param
from bdbench.pruning import prune_batchnorm_channels
from bdbench.training import batches


@torch.no_grad()
def clean_preactivation_stats(model, bns, data, device, batch_size=256):
    """Mean and unbiased variance of each BN's input channels over ``data`` (eval mode)."""
    moments = {name: [0, 0.0, 0.0] for name, _ in bns}  # count, sum, sum of squares (float64)

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # C x (N H W)
            m = moments[name]
            m[0] += x.shape[1]
            m[1] = m[1] + x.sum(1)
            m[2] = m[2] + x.square().sum(1)
        return record

    handles = [bn.register_forward_pre_hook(hook(name)) for name, bn in bns]
    try:
        model.eval()
        for x, _ in batches(data, batch_size, device=device):
            model(x)
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, (n, s, sq) in moments.items():
        mean = s / n
        stats[name] = (mean.float(), ((sq - n * mean.square()) / max(n - 1, 1)).clamp_min(0).float())
    return stats


def kl_scores(clean_mean, clean_var, bn):
    """s_k = KL(N(clean) || N(stored running statistics)) per channel."""
    mu, var = bn.running_mean.float(), bn.running_var.float().clamp_min(1e-12)
    clean_var = clean_var.to(mu.device).clamp_min(1e-12)
    return (0.5 * torch.log(var / clean_var)
            + (clean_var + (clean_mean.to(mu.device) - mu).square()) / (2 * var) - 0.5)


class BNP(Defense):
    """BN-statistics pruning: prune channels whose running statistics diverge (KL) from clean pre-activations."""

    name = "bnp"
    needs = frozenset({"clean"})
    paper = Paper(title="Pre-activation Distributions Expose Backdoor Neurons", venue="NeurIPS", year=2022,
                  url="https://openreview.net/forum?id=wwW-1k1ljIg")

    @attrs.frozen(kw_only=True)
    class Config:
        u: float = param(3.0, source="official RJ-T/NIPS2022_EP_BNP defense.py; BackdoorBench and fork bnp/cifar10.yaml",
                         help="prune channels with KL score above mean + u * std of their layer", check=non_negative)

    def purify(self, model, data, ctx) -> DefenseResult:
        require_batchnorm(model, "bnp")
        model.to(ctx.device)
        bns = batchnorms(model)
        stats = clean_preactivation_stats(model, bns, data.clean, ctx.device, ctx.eval_batch_size)
        pruned: dict[str, list[int]] = {}
        total = 0
        for name, bn in bns:
            s = kl_scores(*stats[name], bn)
            threshold = s.mean() + self.config.u * s.std()
            index = (s > threshold).nonzero().flatten()
            total += len(s)
            if len(index):
                prune_batchnorm_channels(bn, index)
                pruned[name] = index.tolist()
        return DefenseResult(model=model, diagnostics={
            "layers": len(bns), "channels": total,
            "pruned": sum(map(len, pruned.values())), "pruned_channels": pruned,
        })


@hookimpl
def register_defenses(register):
    register(BNP)
