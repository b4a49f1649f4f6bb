"""CLP: Channel Lipschitzness-based Pruning, a data-free defense.

Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022,
arXiv:2208.03111, section 3 (eqs. 5-7) and Algorithm 1:

1. For every convolution followed by a BatchNorm, the k-th channel of the composite map is
   x -> (gamma_k / sigma_k) (W_k * x) + const, so its Lipschitz constant is bounded by the
   *upper bound of the channel Lipschitz constant*
   UCLC_k = || (gamma_k / sigma_k) W_k ||_2 = |gamma_k| / sigma_k * sigma_max(W_k),
   with W_k (C_in x kh x kw) reshaped to a C_in x (kh kw) matrix and sigma_max its largest
   singular value (eq. 6). Earlier layers contribute a factor common to the whole layer, which
   drops out of the per-layer ranking.
2. Per layer l, the threshold is mu_l + u * s_l, the mean and standard deviation of the UCLCs of
   that layer's channels (eq. 7); channels above it are the trigger-sensitive ones (the paper's
   observation: UCLC correlates with the trigger activation change TAC_k).
3. Prune them (their BN output is set to zero); no data, no fine-tuning.

Fidelity notes:
- Pairs come from the forward graph (:func:`bdbench.nn.conv_bn_pairs`, by tensor identity), not
  from module registration order as in the official code, so a BN fed by a residual sum is never
  paired with an unrelated conv (the PreAct-ResNet mispairing the card describes). Such BNs are
  not scored, and a model with no conv->BN pair fails with a one-line error.
- sigma_k = sqrt(running_var_k + eps), what BN actually divides by; the official code omits eps
  (differs only for near-dead channels).
- Pruning sets the BN's gamma_k = beta_k = 0 (:func:`bdbench.pruning.prune_batchnorm_channels`),
  as in BackdoorBench, so the saved state dict carries it. On a pre-activation ResNet the stem conv -> first-block BN pair
  also feeds the identity shortcut with the raw conv output, which the mask does not cut: the
  pruned channel leaves the residual branch only.
- The per-layer standard deviation is the unbiased estimator (torch's default, as the official
  code's tensor ``std()``).
"""
from __future__ import annotations

import attrs
import torch

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.errors import BdbenchError
from bdbench.nn import conv_bn_pairs
from bdbench.params import non_negative, param
from bdbench.pruning import prune_batchnorm_channels


def uclc(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """UCLC_k of every output channel k of the conv->BN pair (eq. 6)."""
    scale = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    return torch.linalg.matrix_norm(w.flatten(2), ord=2)  # largest singular value per channel


class CLP(Defense):
    """Channel Lipschitzness-based Pruning: data-free pruning of channels with an outlying Lipschitz upper bound."""

    name = "clp"
    needs = frozenset()
    paper = Paper(title="Data-free Backdoor Removal based on Channel Lipschitzness", venue="ECCV", year=2022,
                  arxiv="2208.03111")

    @attrs.frozen(kw_only=True)
    class Config:
        u: float = param(3.0, source="paper sec. 4 (default u=3); official defense.py; BackdoorBench clp/cifar10.yaml",
                         help="prune channels with UCLC above mean + u * std of their layer", check=non_negative)

    def purify(self, model, data, ctx) -> DefenseResult:
        model.to(ctx.device).eval()
        pairs = conv_bn_pairs(model, data.image_shape)
        if not pairs:
            raise BdbenchError(f"clp needs convolutions followed by BatchNorm2d (conv->BN pairs), "
                               f"and {type(model).__name__} has none")
        pruned: dict[str, list[int]] = {}
        total = 0
        for conv_name, conv, bn_name, bn in pairs:
            lips = uclc(conv, bn)
            threshold = lips.mean() + self.config.u * lips.std()
            index = (lips > threshold).nonzero().flatten()
            total += len(lips)
            if len(index):
                prune_batchnorm_channels(bn, index)
                pruned[bn_name] = index.tolist()
        return DefenseResult(model=model, diagnostics={
            "pairs": [[c, b] for c, _, b, _ in pairs], "channels": total,
            "pruned": sum(map(len, pruned.values())), "pruned_channels": pruned,
        })


@hookimpl
def register_defenses(register):
    register(CLP)
