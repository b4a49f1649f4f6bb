"""Input calibration of the defender's data, applied before any defense (``--calibrate``).

GIC, Guided Input Calibration: Wei, Yang, Liu, Zha, "Revisiting the Auxiliary Data in Backdoor
Purification", arXiv:2502.07231, section 4. Each auxiliary sample gets its own perturbation,
g(x_i) = x_i + eps_i with ||eps_i||_inf <= delta, learned so that the victim model classifies
the calibrated sample as its label (Eq. 2: min_g sum_i l(f(g(x_i)), y_i), s.t. d(x_i, g(x_i)) <= delta):
L-inf bound 0.1, Adam with learning rate 0.1, 100 steps from zero (section 4.2).

Fidelity notes: the victim is evaluated in eval mode; calibrated images are stored as uint8
(rounded), like every image the defender gets; results are cached per victim model, auxiliary
set and parameters.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.adversarial import perturb
from bdbench.components import ImageSet, to_float, to_uint8
from bdbench.params import fraction, param, positive


@attrs.frozen(kw_only=True)
class GIC:
    """GIC's parameters (seed 002, section 4.2)."""

    bound: float = param(0.1, source="seed 002 section 4.2 (L-inf norm less than 0.1)", check=fraction)
    lr: float = param(0.1, source="seed 002 section 4.2 (Adam, learning rate 0.1)", check=positive)
    steps: int = param(100, source="seed 002 section 4.2 (100 steps, zero initialization)", check=positive)
    batch_size: int = param(256, source="ours: memory only; samples are calibrated independently", check=positive)

    def calibrate(self, model: nn.Module, data: ImageSet, device: torch.device) -> ImageSet:
        """The calibrated copy of ``data``."""
        if len(data) == 0:
            return data
        model.eval()
        out = []
        for start in range(0, len(data), self.batch_size):
            x = to_float(data.images[start:start + self.batch_size]).to(device)
            y = data.labels[start:start + self.batch_size].to(device)

            def objective(m, xa, y=y):
                return -F.cross_entropy(m(xa), y, reduction="sum")

            delta = perturb(model, x, objective, eps=self.bound, step_size=self.lr, steps=self.steps,
                            random_start=False, optimizer="adam")
            out.append(to_uint8(x + delta).cpu())
        return ImageSet(torch.cat(out), data.labels.clone())


CALIBRATIONS = {"gic": GIC}
