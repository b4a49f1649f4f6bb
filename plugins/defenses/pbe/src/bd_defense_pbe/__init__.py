"""PBE (AFT): adversarial fine-tuning, untargeted adversarial examples as surrogate backdoor inputs.

Mu, Niu, Wang, Wang, Miao, Jin, Hua, "Progressive Backdoor Erasing via Connecting Backdoor and
Adversarial Attacks", CVPR 2023, arXiv:2202.06312. Observation (sec. 3): untargeted adversarial
examples of a backdoored model fall mostly into the target class, so they stand in for triggered
inputs. Model repair with clean extra data (AFT, the setting the survey evaluates), each epoch:

  Step 1 (adversarial pass): x' = x + argmax_{||delta||_inf <= eps} CE(f(x + delta), y) by PGD
          (``bdbench.adversarial.pgd``, step eps / alpha_scale), then min_theta CE(f(x'), y);
  Step 2 (clean pass):       min_theta CE(f(x), y).

Fidelity notes:
- Schedule: Steps 1 and 2 alternate every epoch, as the paper's algorithm and the survey's fork
  do; the official ``aft_main.py`` runs 3 adversarial epochs, then 17 clean ones.
- Defaults are the survey fork's (20 epochs, eps 0.02, 7 PGD steps, step eps/5, random start,
  SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256); official AFT uses eps 6/255, no random start and
  lr 1e-3. eps is in pixel space: the fork adds it to normalised tensors and clamps those to [0, 1]
  (not copied); our models normalise inside, so x' stays a valid image.
- PGD runs in eval mode (official AFT); the fork runs it in train mode, so BN statistics absorb the
  adversarial batches (not copied). Training runs in train mode.
- One optimizer for the whole run; the fork builds a fresh one every pass (momentum reset).
- Adversarial examples are made on the batch before the shared crop/flip augmentation.
- The full data-filtering PBE (purifying a poisoned training set) is not implemented: bdbench's
  defenses repair a model with the defender's clean data.
"""
from __future__ import annotations

import attrs

from bdbench import Defense, Paper, hookimpl
from bdbench.adversarial import pgd
from bdbench.components import DefenseResult
from bdbench.params import non_negative, param, positive
from bdbench.training import FineTuning, fit, make_optimizer


class PBE(Defense):
    """PBE/AFT: alternate fine-tuning on untargeted PGD examples and on the clean data."""

    name = "pbe"
    needs = frozenset({"clean"})
    paper = Paper(title="Progressive Backdoor Erasing via Connecting Backdoor and Adversarial Attacks",
                  venue="CVPR", year=2023, arxiv="2202.06312")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        epochs: int = param(20, source="survey fork defense/pbe.py (20 epochs)", check=positive)
        eps: float = param(0.02, source="survey fork pbe config (eps 0.02); official AFT 6/255",
                           help="L-inf budget in pixel space", check=non_negative)
        steps: int = param(7, source="official AFT and fork (7 PGD iterations)", check=positive)
        alpha_scale: float = param(5.0, source="official AFT and fork (step = eps / 5)", check=positive)
        random_start: bool = param(True, source="survey fork (U(-eps, eps)); official AFT starts at x")

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        recipe = attrs.evolve(c.recipe(ctx.dataset.hflip), epochs=1, schedule="constant")
        opt = make_optimizer(model.parameters(), recipe)
        gen = ctx.generator("pbe-pgd")

        def adversarial(x, y):  # Step 1's surrogate backdoor inputs, PGD in eval mode
            model.eval()
            x_adv = pgd(model, x, y, eps=c.eps, step_size=c.eps / c.alpha_scale, steps=c.steps,
                        random_start=c.random_start, generator=gen)
            model.train()
            return x_adv, y

        for e in range(c.epochs):
            fit(model, data.clean, recipe, ctx, batch_transform=adversarial, optimizer=opt,
                description=f"pbe: adversarial pass {e + 1}", stream=f"pbe-adv-{e}")
            fit(model, data.clean, recipe, ctx, optimizer=opt, description=f"pbe: clean pass {e + 1}",
                stream=f"pbe-clean-{e}")
        return DefenseResult(model=model)


@hookimpl
def register_defenses(register):
    register(PBE)
