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


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (Wang et al., IEEE TIP 2004), for images in [0, 1].

    Gaussian window of ``window`` taps (shrunk to the image, kept odd) and ``sigma``, valid
    convolution per channel, constants C1 = 0.01^2 and C2 = 0.03^2 (data range 1); returns the
    mean SSIM map of each sample (shape N), differentiable in both arguments.
    """
    c, h, w = x.shape[1:]
    size = min(window, h, w)
    size -= 1 - size % 2
    t = torch.arange(size, dtype=x.dtype, device=x.device) - size // 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
