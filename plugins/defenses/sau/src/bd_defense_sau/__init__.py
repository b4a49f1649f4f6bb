"""SAU: Shared Adversarial Unlearning, unlearn the adversarial examples the model shares with the backdoored one.

Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023, arXiv:2307.10562 (section 4, Algorithm 1). The paper
bounds the backdoor risk of the purified model h_theta by its *shared* adversarial risk with
the frozen backdoored model h_theta0, and minimises it with a bi-level objective, per batch:

1. Maximisation (shared adversarial examples, SAE): a PGD perturbation delta, ||delta||_inf <= eps,
   that *minimises*  L_gen = beta_1 L_adv + beta_2 L_share  with
     L_adv   = -(1/2n) [ sum_{i: h_theta not fooled} CE(h_theta(x_i + delta_i), y_i)
                         + sum_{i: h_theta0 not fooled} CE(h_theta0(x_i + delta_i), y_i) ],
     L_share =  (1/n) sum_{i: not shared} JS(p_theta(.|x_i + delta_i) || p_theta0(.|x_i + delta_i)),
   where "fooled" is a prediction on x + delta that differs from the model's prediction on x and
   "shared" is both fooled onto the same label: delta pushes BOTH models off y and onto one wrong label.
2. Minimisation (unlearning), with y0_i = argmax p_theta0(.|x_i + delta_i):
     L = lambda_1 CE(h_theta(x), y) + lambda_2 CE(h_theta(x + delta), y) + lambda_3 L_SAU,
     L_SAU = (1/n) sum_{i in P} -log(1 - p_theta(y0_i | x_i + delta_i)),
   P = the samples on which the reference is fooled (y0_i != y_i and != its clean prediction);
   one Adam step on theta.
Rounds: ``n_rounds`` passes over the defender's clean data.

Fidelity notes:
- Names and defaults follow the reference implementation (BackdoorBench ``defense/sau.py`` and
  ``config/defense/sau``, written by the paper's first author, which the survey ran): beta_1 0.01,
  beta_2 1 (the maximisation weights), lmd_1 1, lmd_2 0, lmd_3 1 (clean, plain adversarial and
  shared-unlearning weights), Adam lr 1e-4 without weight decay, 100 rounds, batch 256, L-inf
  eps 0.2 with PGD step 0.2 and 5 steps, no augmentation. The paper's own numbering of the
  lambdas differs (its lambda_3 = 0.01 is the reference's beta_1).
- Perturbations are in pixel space [0, 1], as the reference's denormalise-add-renormalise does;
  our models normalise inside. As in the reference, PGD starts at +eps in every pixel
  (``start="max"``) and x + delta is not clipped to [0, 1] (``clip=false``: the reference
  comments that clipping "is not necessary"); both are parameters of the shared primitive
  :func:`bdbench.adversarial.perturb`. As in the reference, PGD stops early once every sample
  of the batch is shared (then every loss term is masked out and delta could not move); a
  shared sample in a batch that goes on gets a zero gradient and stays put, as it would.
- The set P is the reference code's ("the reference model is fooled"), not the paper's
  "shared and wrong"; the survey measured the code. -log(1 - p) is computed stably as
  -logsumexp_{k != y0} log p_k instead of the reference's clamped average of two equal terms.
- BatchNorm is frozen: both models are in eval mode throughout (the reference default;
  ``train_mode=true`` unfreezes it for the unlearning pass only, as the reference's flag does).
  The learning rate is constant: the reference builds a scheduler but never steps it.
- No test-set evaluation during the rounds; the last model is returned.
- Measured on the smoke preset (Fashion-MNIST subset, smallcnn width 16, BadNets 10%, spc 100,
  seed 0) at the defaults: ACC 0.834 -> 0.825, ASR 0.996 -> 0.570, RA 0.388. The +eps start and
  the missing clip matter here: with a random start and clipping, ASR only fell to 0.887.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from bdbench import Defense, Paper, hookimpl
from bdbench.adversarial import perturb
from bdbench.components import DefenseResult
from bdbench.nn import clone
from bdbench.params import non_negative, param, positive
from bdbench.training import Recipe, fit

REF = "BackdoorBench defense/sau.py + config/defense/sau"


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between rows of the probability matrices ``p`` and ``q``."""
    p, q = p.clamp_min(1e-8), q.clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1))


class SAU(Defense):
    """Shared Adversarial Unlearning: unlearn PGD examples that fool the model and the backdoored model alike."""

    name = "sau"
    needs = frozenset({"clean"})
    paper = Paper(title="Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples",
                  venue="NeurIPS", year=2023, arxiv="2307.10562")

    @attrs.frozen(kw_only=True)
    class Config:
        n_rounds: int = param(100, source=f"{REF} (n_rounds); paper sec. 5.1: 100 epochs",
                              help="passes over the clean data", check=positive)
        lr: float = param(1e-4, source=f"{REF} (Adam lr)", help="Adam learning rate", check=positive)
        batch_size: int = param(256, source=f"{REF} (batch_size)", check=positive)
        eps: float = param(0.2, source=f"{REF} (trigger_norm); paper sec. 5.1: L-inf bound 0.2",
                           help="L-inf radius of delta in pixel units", check=positive)
        adv_lr: float = param(0.2, source=f"{REF} (adv_lr)", help="PGD step size", check=positive)
        adv_steps: int = param(5, source=f"{REF} (adv_steps); paper sec. 5.1: 5 PGD steps", check=positive)
        beta_1: float = param(0.01, source=f"{REF} (beta_1); paper's lambda_3", help="weight of L_adv in L_gen",
                              check=non_negative)
        beta_2: float = param(1.0, source=f"{REF} (beta_2)", help="weight of L_share in L_gen", check=non_negative)
        lmd_1: float = param(1.0, source=f"{REF} (lmd_1)", help="weight of the clean loss", check=non_negative)
        lmd_2: float = param(0.0, source=f"{REF} (lmd_2: plain adversarial training off)",
                             help="weight of CE on x + delta", check=non_negative)
        lmd_3: float = param(1.0, source=f"{REF} (lmd_3)", help="weight of L_SAU", check=non_negative)
        start: Literal["max", "random", "zero"] = param("max", source=f"{REF} (pgd_init max: delta = +eps)",
                                                        help="where PGD starts")
        clip: bool = param(False, source=f"{REF} (x + delta not clipped to the image range)",
                           help="keep x + delta in [0, 1]")
        train_mode: bool = param(False, source=f"{REF} (--train_mode, off: BN frozen)",
                                 help="BatchNorm in train mode for the unlearning pass")

    def shared_adversarial(self, model, reference, x: torch.Tensor, y: torch.Tensor, clean_pred_ref: torch.Tensor,
                           generator, stats: dict[str, int]) -> torch.Tensor:
        """Step 1: delta minimising beta_1 L_adv + beta_2 L_share (PGD ascent on its negative)."""
        c = self.config
        with torch.no_grad():
            clean_pred = model(x).argmax(1)
        n = len(x)
        all_shared = [False]

        def objective(m, x_adv):
            logits, logits_ref = m(x_adv), reference(x_adv)
            pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
            fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
            shared = fooled & fooled_ref & (pred == pred_ref)
            all_shared[0] = bool(shared.all())
            stats["pgd_evaluations"] += 1
            ce, ce_ref = F.cross_entropy(logits, y, reduction="none"), F.cross_entropy(logits_ref, y, reduction="none")
            l_adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / (2 * n)
            l_share = (js_divergence(logits.softmax(1), logits_ref.softmax(1)) * ~shared).sum() / n
            return -(c.beta_1 * l_adv + c.beta_2 * l_share)

        return perturb(model, x, objective, eps=c.eps, step_size=c.adv_lr, steps=c.adv_steps, norm="linf",
                       generator=generator, start=c.start, clip=c.clip, stop=lambda: all_shared[0])

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        reference = clone(model).to(ctx.device).eval().requires_grad_(False)  # h_theta0, frozen
        generator = ctx.generator("sau: pgd")
        stats = {"batches": 0, "shared": 0, "reference_fooled": 0, "samples": 0, "pgd_evaluations": 0}

        def loss_fn(model, x, y):
            model.eval()
            with torch.no_grad():
                clean_pred_ref = reference(x).argmax(1)
            delta = self.shared_adversarial(model, reference, x, y, clean_pred_ref, generator, stats)
            x_adv = (x + delta).detach()
            with torch.no_grad():
                y0 = reference(x_adv).argmax(1)
            model.train(c.train_mode)  # step 2: unlearning pass
            logits, logits_adv = model(torch.cat([x, x_adv])).split(len(x))
            potential = (y0 != y) & (y0 != clean_pred_ref)  # P: the reference is fooled
            log_p = logits_adv.log_softmax(1)
            log_not_y0 = log_p.masked_fill(F.one_hot(y0, log_p.shape[1]).bool(), float("-inf")).logsumexp(1)
            l_sau = -(log_not_y0 * potential).sum() / len(x)
            stats["batches"] += 1
            stats["samples"] += len(x)
            stats["reference_fooled"] += int(potential.sum())
            stats["shared"] += int((potential & (logits_adv.argmax(1) == y0)).sum())
            return (c.lmd_1 * F.cross_entropy(logits, y) + c.lmd_2 * F.cross_entropy(logits_adv, y)
                    + c.lmd_3 * l_sau)

        recipe = Recipe(epochs=c.n_rounds, batch_size=c.batch_size, lr=c.lr, optimizer="adam", weight_decay=0.0,
                        schedule="constant", crop_padding=0, hflip=False)
        fit(model, data.clean, recipe, ctx, loss_fn=loss_fn, description="sau: shared adversarial unlearning")
        n = max(stats["samples"], 1)
        return DefenseResult(model=model, diagnostics={
            "shared_fraction": stats["shared"] / n, "reference_fooled_fraction": stats["reference_fooled"] / n,
            "pgd_evaluations_per_batch": stats["pgd_evaluations"] / max(stats["batches"], 1)})


@hookimpl
def register_defenses(register):
    register(SAU)
