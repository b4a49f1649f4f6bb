"""Boundary distance: mean minimal L2 perturbation that flips clean and backdoor test samples.

Su et al., "Burn: Backdoor Unlearning via Adversarial Boundary Analysis", 2025,
arXiv:2507.10491 (seed 004), section 2.3 and Table 1: the boundary distance of a sample x is
||r(x)||_2, r the minimal boundary-crossing perturbation found by DeepFool
(:func:`bdbench.adversarial.minimal_perturbation`). Table 1 reports that backdoor (poison)
samples lie farther from the decision boundary than clean ones (CIFAR-10: 0.571 clean vs
1.116 BadNets). Per stage:

- ``boundary_clean``: mean ||r|| over clean test samples;
- ``boundary_backdoor``: mean ||r|| over backdoor test samples (the eligible test images with
  the trigger applied).

Fidelity notes:
- Table 1 measures training poison samples; a metric sees only the test sets, so it measures
  the backdoor test samples (same trigger, unseen images).
- Every installed metric runs on every run, and DeepFool costs one backward pass per class
  per step: ``samples`` (default 32) images of each set are measured, drawn with a fixed seed
  so that before and after use the same images. Metrics are built with their defaults. On the
  smoke preset (2 CPU cores, shared) 64 images per set cost about 5 s per evaluation; at 32
  the means are noisy (seed 0 BadNets: clean 0.86 vs backdoor 0.94 at 64 images, 0.77 vs
  0.94 at 256): compare runs on the same samples, not single values.
- Images in pixel space [0, 1], distances in that space (28x28 gray: at most 28).
"""
from __future__ import annotations

import attrs
import torch

from bdbench import Metric, Paper, hookimpl
from bdbench.adversarial import boundary_distances
from bdbench.components import Evaluation, to_float
from bdbench.errors import BdbenchError
from bdbench.params import non_negative, param, positive

NEEDED = ("model", "clean", "bd_source", "trigger")


def mean_boundary_distance(model, x: torch.Tensor, *, device, batch_size: int = 256, max_iter: int = 50,
                           overshoot: float = 0.02) -> float:
    """Mean ||r||_2 of DeepFool's minimal perturbation over float images ``x`` in [0, 1]."""
    norms, _ = boundary_distances(model, x, device=device, batch_size=batch_size, max_iter=max_iter,
                                  overshoot=overshoot)
    return float(norms.mean()) if len(norms) else float("nan")


def _sample(n: int, k: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k] if k < n else torch.arange(n)


class Boundary(Metric):
    """Mean DeepFool boundary distance of clean and of backdoor test samples (Burn, Table 1)."""

    name = "boundary"
    columns = ("boundary_clean", "boundary_backdoor")
    paper = Paper(title="Burn: Backdoor Unlearning via Adversarial Boundary Analysis", year=2025, arxiv="2507.10491")

    @attrs.frozen(kw_only=True)
    class Config:
        samples: int = param(32, source="bdbench: bounded cost per evaluation (the paper uses every sample)",
                             help="test images measured per set", check=positive)
        max_iter: int = param(50, source="DeepFool reference code (max_iter=50)", check=positive)
        overshoot: float = param(0.02, source="DeepFool paper sec. 3 (overshoot 0.02)", check=non_negative)

    def compute(self, ev: Evaluation) -> dict[str, float]:
        missing = [f for f in NEEDED if getattr(ev, f, None) is None]
        if missing:
            raise BdbenchError(f"metric 'boundary' needs the model and the test images, but the evaluation has no "
                               f"{', '.join(missing)} (a core that passes Evaluation(model=, clean=, bd_source=, "
                               f"trigger=, device=) is required)")
        c, device = self.config, getattr(ev, "device", None) or torch.device("cpu")
        clean = to_float(ev.clean.images[_sample(len(ev.clean), c.samples)])
        backdoor = to_float(ev.bd_source.images[_sample(len(ev.bd_source), c.samples)])
        if len(backdoor):
            with torch.no_grad():
                backdoor = ev.trigger(backdoor)
        kw = dict(device=device, max_iter=c.max_iter, overshoot=c.overshoot)
        return {"boundary_clean": mean_boundary_distance(ev.model, clean, **kw),
                "boundary_backdoor": mean_boundary_distance(ev.model, backdoor, **kw)}


@hookimpl
def register_metrics(register):
    register(Boundary)
