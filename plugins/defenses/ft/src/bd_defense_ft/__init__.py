"""FT: fine-tuning the whole backdoored model on the defender's clean data.

The fine-tuning baseline studied in Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, arXiv:1805.12185 (section 4), and the
survey's fine-tuning baseline (Dunnett et al., arXiv:2411.11200, section IV-A):

    theta* = argmin_theta (1/n) sum_i CE(f_theta(x_i), y_i)   over all parameters, train mode

Fidelity notes:
- Defaults are BackdoorBench's (``config/defense/ft``), kept by the survey's fork: 100 epochs,
  SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, batch 256, random crop and
  (natural images only) horizontal flip. Every preset runs them as they are; ``epochs`` is a
  parameter, recorded in the row.
- BatchNorm running statistics are updated (train mode), as in the reference; at spc 2 they
  follow a handful of images.
- No test-set evaluation or checkpoint selection ("valid_max" in BackdoorBench is an oracle).
"""
from __future__ import annotations

import attrs

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.training import FineTuning, fit


class FT(Defense):
    """Fine-tuning: cross-entropy on the clean budget, all parameters."""

    name = "ft"
    needs = frozenset({"clean"})
    paper = Paper(title="Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
                  venue="RAID", year=2018, arxiv="1805.12185")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        """BackdoorBench's FT defaults (see :class:`bdbench.training.FineTuning`)."""

    def purify(self, model, data, ctx) -> DefenseResult:
        fit(model, data.clean, self.config.recipe(ctx.dataset.hflip), ctx, description="ft: fine-tuning")
        return DefenseResult(model=model)


@hookimpl
def register_defenses(register):
    register(FT)
