"""Generative trigger synthesis: a max-entropy trigger generator and its MINE entropy estimator.

Shared by the defenses that model the distribution of valid triggers for a known target label
(MESA, Qiao, Yang, Li, NeurIPS 2019, arXiv:1910.04749; BAERASER, Liu et al., INFOCOM 2022,
arXiv:2201.09538, which reuses MESA's generator):

- :class:`TriggerGenerator` G maps z ~ U[0, 1]^d to a small trigger t = G(z) in [0, 1]^{C x h x w}
  (an MLP that injects a fresh slice of z at each layer, sigmoid output);
- :class:`MINE` estimates I(z; G(z)) with the Donsker-Varadhan bound
  I_hat = E_joint[T(z, t)] - log E_marginal[exp T(z', t)] (Belghazi et al., ICML 2018); since G is
  deterministic, I(z; G(z)) is the entropy of the triggers the sub-model produces;
- :func:`train_generator` trains one sub-model for a confidence threshold beta:
  min_G -E_{x, z}[min(p(y_t | x (+) G(z)), beta)] - alpha * I_hat(z; G(z)),
  alternating one step of G (through :func:`bdbench.training.fit`, the classifier frozen in eval
  mode) and one step of the statistics network T (its own Adam, in ``after_step``);
- :func:`place` stamps one trigger per image at a random position inside the trigger's bounding
  box (``DefenseData.trigger_hint``); :func:`trigger_success` measures how often generated
  triggers send non-target images to the target.
"""
from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench.components import ImageSet, to_float
from bdbench.errors import ParameterError
from bdbench.params import non_negative, param, positive, unit_interval
from bdbench.training import Recipe, fit
from bdbench.triggers import stamp

MESA_CODE = "MESA official code (superrrpotato/Defending-Neural-Backdoors-via-Generative-Distribution-Modeling)"

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def _pair(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if len(value) != 2 or not all(0 <= v < 1 for v in value):
        raise ValueError(f"{attribute.name} must be two numbers in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class MaxEntropy:
    """Hyper-parameters of the max-entropy trigger generator (a base class for a method's Config).

    Defaults: MESA's official CIFAR-10 code as summarised in defense-cards.md (BAERASER's code
    reuses them, with hidden width 2048).
    """

    alpha: float = param(0.1, source=f"{MESA_CODE} (alpha 0.1)", help="weight of the entropy term",
                         check=non_negative)
    z_dim: int = param(64, source=f"{MESA_CODE} (in_size 64)", help="noise dimension (split in 4 slices)",
                       check=positive)
    hidden: int = param(512, source=f"{MESA_CODE} (hidden 512 on CIFAR-10, 2048 on CIFAR-100)",
                        help="width of G and of the MINE network", check=positive)
    gen_epochs: int = param(10, source=f"{MESA_CODE} (10 epochs)", help="generator epochs over the clean data",
                            check=positive)
    gen_batch_size: int = param(128, source=f"{MESA_CODE} (batch 128)", check=positive)
    gen_lr: float = param(2e-4, source=f"{MESA_CODE} (Adam lr 2e-4 for G and MINE)", check=positive)
    gen_adam_betas: tuple[float, float] = param((0.5, 0.999), source=f"{MESA_CODE} (Adam betas)", check=_pair)
    noise_std: float = param(0.1, source=f"{MESA_CODE} (Gaussian noise 0.1 on the trigger while training G)",
                             check=non_negative)
    trigger_size: int = param(3, source=f"{MESA_CODE} (3x3 triggers at 32x32); scaled to the image, "
                              "at most the hint box", help="trigger side at 32x32", check=positive)
    mine_ma_rate: float = param(0.001, source=f"{MESA_CODE} (MINE moving-average rate)", check=unit_interval)


class TriggerGenerator(nn.Module):
    """G: z in [0, 1]^{z_dim} -> trigger in [0, 1]^{C x h x w}.

    Four linear layers; layer k reads the previous activation concatenated with the k-th quarter
    of z (noise injected at every layer); BatchNorm and LeakyReLU(0.2) between layers, a sigmoid
    at the end.
    """

    def __init__(self, trigger_shape: tuple[int, int, int], z_dim: int = 64, hidden: int = 512) -> None:
        super().__init__()
        if z_dim < 4:
            raise ParameterError(f"z_dim must be at least 4 (four noise slices), got {z_dim}")
        self.trigger_shape = tuple(trigger_shape)
        self.z_dim, self.slice = z_dim, z_dim // 4
        out = math.prod(trigger_shape)
        s = self.slice
        self.fc = nn.ModuleList([nn.Linear(s, hidden), nn.Linear(hidden + s, hidden), nn.Linear(hidden + s, hidden),
                                 nn.Linear(hidden + s, out)])
        self.bn = nn.ModuleList([nn.BatchNorm1d(hidden) for _ in range(3)])

    def noise(self, n: int, generator: torch.Generator | None = None,
              device: torch.device | None = None) -> torch.Tensor:
        """z ~ U[0, 1]^{z_dim}, n rows."""
        return torch.rand(n, self.z_dim, generator=generator).to(device or self.fc[0].weight.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.slice
        h = self.fc[0](z[:, :s])
        for k in range(1, 4):
            h = F.leaky_relu(self.bn[k - 1](h), 0.2)
            h = self.fc[k](torch.cat([h, z[:, k * s:(k + 1) * s]], dim=1))
        return torch.sigmoid(h).view(len(z), *self.trigger_shape)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n triggers from the trained generator (eval mode: BatchNorm running statistics)."""
        mode = self.training
        self.eval()
        try:
            return self(self.noise(n, generator))
        finally:
            self.train(mode)


class MINE(nn.Module):
    """Statistics network T(z, t) of the MINE estimator of I(z; t).

    ``lower_bound`` is the Donsker-Varadhan bound; ``loss`` is the negative bound with the
    moving-average correction of the gradient of log E[e^T] (Belghazi et al., sec. 3.2), which
    the statistics network minimises.
    """

    def __init__(self, z_dim: int, t_dim: int, hidden: int = 512, ma_rate: float = 0.001) -> None:
        super().__init__()
        self.fc_z = nn.Linear(z_dim, hidden, bias=False)
        self.fc_t = nn.Linear(t_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)
        self.ma_rate = ma_rate
        self.ma_et: float | None = None

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc_z(z) + self.fc_t(t.flatten(1)), 0.2)
        return self.fc3(F.leaky_relu(self.fc2(h), 0.2)).squeeze(1)

    def lower_bound(self, z: torch.Tensor, z_marginal: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """I_hat = mean T(z, t) - log mean exp T(z', t), with (z, t) joint and (z', t) independent."""
        joint, marginal = self(z, t), self(z_marginal, t)
        return joint.mean() - (torch.logsumexp(marginal, 0) - math.log(len(marginal)))

    def loss(self, z: torch.Tensor, z_marginal: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """-(mean T_joint - mean e^T_marginal / ma(e^T)): the bias-corrected objective, negated."""
        joint, marginal = self(z, t), self(z_marginal, t)
        et = marginal.exp().mean()
        value = float(et.detach())
        self.ma_et = value if self.ma_et is None else self.ma_et + self.ma_rate * (value - self.ma_et)
        return -(joint.mean() - et / max(self.ma_et, 1e-12))


def check_box(box: Box | None, image_shape: tuple[int, int, int]) -> Box:
    """The hint box as ints, or a ParameterError when it is missing or outside the image."""
    if box is None:
        raise ParameterError("this defense needs the trigger's bounding box (trigger_hint)")
    top, left, height, width = (int(v) for v in box)
    _, h, w = image_shape
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > h or left + width > w:
        raise ParameterError(f"trigger_hint {tuple(box)} is not a box inside a {h}x{w} image")
    return top, left, height, width


def check_target(target: int | None, num_classes: int) -> int:
    """The target label as an int, or a ParameterError when it is missing or not a class."""
    if target is None or not 0 <= int(target) < num_classes:
        raise ParameterError(f"this defense needs the backdoor target label (target_label), got {target!r}")
    return int(target)


def trigger_shape(box: Box, image_shape: tuple[int, int, int], size_at_32: int) -> tuple[int, int, int]:
    """(C, h, w) of a generated trigger: side round(size_at_32 * H / 32), at most the box."""
    c, h, _ = image_shape
    side = max(1, round(size_at_32 * h / 32))
    return c, min(side, box[2]), min(side, box[3])


def place(images: torch.Tensor, patches: torch.Tensor, box: Box,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Stamp ``patches[i]`` (N x C x h x w) onto ``images[i]`` at a random position inside ``box``.

    Differentiable with respect to ``patches``; pixels outside the patch are untouched.
    """
    n, c, height, width = images.shape
    th, tw = patches.shape[-2:]
    top, left, bh, bw = box
    if th > bh or tw > bw:
        raise ParameterError(f"a {th}x{tw} trigger does not fit the {bh}x{bw} hint box")
    dy = torch.randint(0, bh - th + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, bw - tw + 1, (n,), generator=generator).to(images.device)
    rows = (top + dy).view(n, 1, 1) + torch.arange(th, device=images.device).view(1, th, 1)
    cols = (left + dx).view(n, 1, 1) + torch.arange(tw, device=images.device).view(1, 1, tw)
    idx = torch.arange(n, device=images.device).view(n, 1, 1)
    mask = images.new_zeros(n, height, width, 1)
    mask[idx, rows, cols] = 1.0
    pattern = images.new_zeros(n, height, width, c).index_put((idx, rows, cols), patches.to(images).permute(0, 2, 3, 1))
    return stamp(images, mask.permute(0, 3, 1, 2), pattern.permute(0, 3, 1, 2))


def hinge(probabilities: torch.Tensor, beta: float) -> torch.Tensor:
    """min(p, beta): the confidence a sub-model for threshold ``beta`` is rewarded for (no gain above beta)."""
    return torch.clamp(probabilities, max=beta)


@attrs.define
class GeneratorHistory:
    """Per-epoch means while training one sub-model."""

    beta: float
    hinge: list[float] = attrs.Factory(list)
    entropy: list[float] = attrs.Factory(list)  # the MINE estimate of I(z; G(z))
    confidence: list[float] = attrs.Factory(list)  # mean p(y_t | x + noisy trigger)
    loss: list[float] = attrs.Factory(list)  # the generator loss -hinge - alpha * I_hat

    def summary(self) -> dict[str, Any]:
        last = {k: round(getattr(self, k)[-1], 5) if getattr(self, k) else None
                for k in ("hinge", "entropy", "confidence", "loss")}
        return {"beta": self.beta, **last, "loss_per_epoch": [round(v, 5) for v in self.loss]}


def train_generator(model: nn.Module, clean: ImageSet, *, target: int, box: Box, beta: float, config: MaxEntropy,
                    ctx: Any, stream: str = "synthesis") -> tuple[TriggerGenerator, GeneratorHistory]:
    """Train one max-entropy sub-model G_beta for ``target`` on the clean data (classifier frozen).

    Each step: z, z' ~ U[0,1]^d; t = G(z); x' = x (+) clip(t + N(0, noise_std^2)) placed in ``box``;
    G minimises -mean min(p(target | x'), beta) - alpha * I_hat(z; t), then the MINE network takes
    one step on fresh noise. Returns G (train mode kept for BatchNorm; use ``sample``) and history.
    """
    c = config
    shape = trigger_shape(box, tuple(clean.shape), c.trigger_size)
    gen = ctx.generator(stream)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        G = TriggerGenerator(shape, c.z_dim, c.hidden).to(ctx.device)
        M = MINE(c.z_dim, math.prod(shape), c.hidden, c.mine_ma_rate).to(ctx.device)
    G.train()
    M.train()
    g_opt = torch.optim.Adam(G.parameters(), lr=c.gen_lr, betas=tuple(c.gen_adam_betas))
    m_opt = torch.optim.Adam(M.parameters(), lr=c.gen_lr, betas=tuple(c.gen_adam_betas))
    history = GeneratorHistory(beta=beta)
    sums = {"hinge": 0.0, "entropy": 0.0, "confidence": 0.0, "loss": 0.0, "n": 0}

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net.eval()  # the victim is frozen (BN running statistics), as in the reference
        z, z_marginal = G.noise(len(x), gen), G.noise(len(x), gen)
        t = G(z)
        noisy = (t + c.noise_std * torch.randn(t.shape, generator=gen).to(t)).clamp(0, 1)
        p = F.softmax(net(place(x, noisy, box, gen)), dim=1)[:, target]
        h = hinge(p, beta).mean()
        mi = M.lower_bound(z, z_marginal, t)
        loss = -h - c.alpha * mi
        for key, value in (("hinge", h), ("entropy", mi), ("confidence", p.mean()), ("loss", loss)):
            sums[key] += float(value.detach())
        sums["n"] += 1
        return loss

    def mine_step() -> None:
        n = c.gen_batch_size
        z, z_marginal = G.noise(n, gen), G.noise(n, gen)
        with torch.no_grad():
            t = G(z)
        m_opt.zero_grad(set_to_none=True)
        M.loss(z, z_marginal, t).backward()
        m_opt.step()

    def after_epoch(epoch: int) -> None:
        for key in ("hinge", "entropy", "confidence", "loss"):
            getattr(history, key).append(sums[key] / max(sums["n"], 1))
        sums.update(hinge=0.0, entropy=0.0, confidence=0.0, loss=0.0, n=0)

    recipe = Recipe(epochs=c.gen_epochs, batch_size=c.gen_batch_size, lr=c.gen_lr, optimizer="adam",
                    weight_decay=0.0, schedule="constant", amp=False)
    fit(model, clean, recipe, ctx, loss_fn=loss_fn, after_step=mine_step, after_epoch=after_epoch,
        params=G.parameters(), optimizer=g_opt, description=f"{stream}: generator beta={beta}",
        stream=f"{stream}: fit")  # fit() freezes the classifier: only G is optimised
    model.eval()
    return G, history


@torch.no_grad()
def trigger_success(model: nn.Module, data: ImageSet, generator: TriggerGenerator, *, target: int, box: Box,
                    device: torch.device, rng: torch.Generator | None = None, batch_size: int = 512) -> float:
    """Share of ``data``'s non-target images sent to ``target`` by generated triggers (one per image)."""
    model.eval()
    keep = data.labels != target
    images = data.images[keep]
    if len(images) == 0:
        return float("nan")
    hits = 0
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device)
        t = generator.sample(len(x), rng)
        hits += int((model(place(x, t, box, rng)).argmax(1) == target).sum())
    return hits / len(images)
