"""NFT: Neural mask Fine-Tuning, MixUp-trained soft masks on BN scales, bounded by a depth schedule.

Karim, Arafat, Khalid, Guo, Rahnavard, "Augmented Neural Fine-Tuning for Efficient Backdoor
Purification", ECCV 2024, arXiv:2407.10052, section 4:

1. backdoor suppressor (eq. 4): L_mix = E_lambda CE(f(lam x_i + (1 - lam) x_j), lam y_i + (1 - lam) y_j),
   lam ~ Beta; MixUp stands in for the unknown trigger (eq. 3);
2. clean-accuracy retainer (eq. 6-8): optimise only one scalar mask m_l^(i) per neuron,
   theta (.) M, with m_l^(i) in [mu(l), 1] and the schedule mu(l) = alpha exp(-beta l) (sec. 4.2);
3. mask regulariser (eq. 9): min_M L_mix(theta (.) M) + eta_c ||M_0 - M||_1, M_0 = 1,
   eta_c = 5e-4 / n_c with n_c the clean samples per class (sec. 4.3);
4. SGD, lr 0.05, momentum 0.95, 100 epochs over the clean data (sec. 5.1); theta_c = theta (.) M^.

Fidelity notes:
- Masks act on the BatchNorm scales gamma (``bdbench.masking.NeuronMasks``), as in the
  reference code (nazmul-karim170/NFT); the paper writes them on each neuron's weight vector
  (eq. 8). Every affine BN2d is masked, l = 1..L in forward order; the reference leaves ResNet's
  stem BN unmasked (PreAct-ResNets have none). Biases are not masked (sec. 4.2).
- Iterations: 100 epochs over the defender's clean set, batch 128, as the paper states. The
  reference's ``nb_epochs = 1000`` are mini-batch iterations (1000 / epoch_aggregation 200 = 5
  outer steps of 200 batches drawn with replacement), i.e. 1000 updates regardless of data size;
  at 1% of CIFAR-10 (500 images) 100 epochs are 400 updates.
- eta_c = 5e-4 / n_c (paper eq. 9); the reference uses 1e-3 / n_c. n_c is the mean count per class.
- MixUp Beta(1, 1) (reference; the paper says Beta(alpha, beta) without values), mixing within
  the batch by a random permutation; the mixed label enters as lam CE(y_a) + (1 - lam) CE(y_b).
- Schedule alpha 0.8, beta 0.5: the paper's best pair (Table 6), the reference defaults.
- Constant lr (the paper states none); the reference anneals 0.05 -> 0.02 by cosine over its 5
  outer steps. No weight decay on the masks (reference).
- Train mode throughout (reference): BN uses batch statistics and its running statistics are
  updated on the mixed images; the purified model keeps them.
- No validation split is used: NFT selects nothing (``uses_validation`` False).
"""
from __future__ import annotations

import attrs
import torch

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.losses import mixup, mixup_cross_entropy
from bdbench.masking import NeuronMasks, exponential_schedule
from bdbench.params import non_negative, param, positive
from bdbench.training import Recipe, fit


class NFT(Defense):
    """NFT: MixUp fine-tuning of soft BN-scale masks bounded below by mu(l) = alpha exp(-beta l)."""

    name = "nft"
    needs = frozenset({"clean"})
    paper = Paper(title="Augmented Neural Fine-Tuning for Efficient Backdoor Purification",
                  venue="ECCV", year=2024, arxiv="2407.10052")

    @attrs.frozen(kw_only=True)
    class Config:
        epochs: int = param(100, source="paper sec. 5.1 (reference: 1000 iterations, see Fidelity notes)",
                            check=positive)
        lr: float = param(0.05, source="paper sec. 5.1", check=positive)
        momentum: float = param(0.95, source="paper sec. 5.1", check=non_negative)
        batch_size: int = param(128, source="reference code nazmul-karim170/NFT", check=positive)
        alpha: float = param(0.8, source="paper sec. 4.2 and Table 6", help="mu(l) = alpha exp(-beta l)",
                             check=non_negative)
        beta: float = param(0.5, source="paper sec. 4.2 and Table 6", help="mu(l) = alpha exp(-beta l)",
                            check=non_negative)
        eta: float = param(5e-4, source="paper sec. 4.3, eq. 9", help="eta_c = eta / n_c", check=non_negative)
        mixup_alpha: float = param(1.0, source="reference code (Beta(1, 1))", help="lambda ~ Beta(a, a)",
                                   check=positive)

    def purify(self, model, data, ctx) -> DefenseResult:
        cfg = self.config
        masks = NeuronMasks(model, input_shape=data.image_shape, method="nft")
        mu = exponential_schedule(len(masks.masks), cfg.alpha, cfg.beta)
        masks.clamp_(mu, 1.0)
        n_c = len(data.clean) / data.num_classes
        eta_c = cfg.eta / n_c
        gen = ctx.generator("nft-mixup")

        def loss_fn(m, x, y):  # eq. 9: L_mix + eta_c ||M_0 - M||_1
            x_mix, y_a, y_b, lam = mixup(x, y, cfg.mixup_alpha, gen)
            return mixup_cross_entropy(m(x_mix), y_a, y_b, lam) + eta_c * regularizer(masks)

        recipe = Recipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                        weight_decay=0.0, schedule="constant")
        fit(model, data.clean, recipe, ctx, loss_fn=loss_fn, params=masks.parameters(),
            after_step=lambda: masks.clamp_(mu, 1.0), description="nft: mask fine-tuning")
        values = masks.flat()
        masks.bake()
        model.eval()
        return DefenseResult(model=model, diagnostics={
            "layers": len(masks.masks), "neurons": len(values), "eta_c": eta_c,
            "mask_mean": values.mean().item(), "mask_min": values.min().item(),
            "at_lower_bound": int(sum((m.detach() <= lo + 1e-6).sum().item() for m, lo in zip(masks.masks, mu))),
        })


def regularizer(masks: NeuronMasks) -> torch.Tensor:
    """||M_0 - M||_1 with M_0 = 1 (eq. 9)."""
    return sum((1 - m).abs().sum() for m in masks.masks)


@hookimpl
def register_defenses(register):
    register(NFT)
