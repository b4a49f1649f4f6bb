"""Losses and data mixing shared by the distillation and fine-tuning defenses."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al., arXiv:1710.09412): x~ = lam x_i + (1 - lam) x_j, lam ~ Beta(alpha, alpha).

    Returns ``(x_mixed, y_a, y_b, lam)``; the loss is ``lam CE(., y_a) + (1 - lam) CE(., y_b)``.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample().item()) if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t / T) || softmax(s / T)) (Hinton et al., arXiv:1503.02531)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map: mean over channels of |a|^p, flattened, L2-normalised
    (Zagoruyko & Komodakis, arXiv:1612.03928)."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_distillation(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """|| A(student) - A(teacher) ||_2 averaged over the batch (NAD, Li et al., arXiv:2101.05930)."""
    return (attention_map(student, p) - attention_map(teacher, p)).norm(dim=1).mean()
