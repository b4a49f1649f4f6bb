"""LIRA: a learned, L-inf-bounded additive trigger, optimised jointly with the classifier.

Doan, Lao, Zhao, Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021
(CVF open access), section 3 (Eq. 2-4, Algorithm 1); official code
sunbelbd/invisible_backdoor_attacks and the ports BackdoorBench ``attack/lira.py`` and
BackdoorBox ``LIRA.py``.

- Trigger function: T_xi(x) = clip(x + eps * g_xi(x)), g an autoencoder ending in tanh, so
  ||T(x) - x||_inf <= eps (in normalised-input units, as in the paper's code).
- Objective (Eq. 3-4): min_theta sum alpha L(f_theta(x), y) + (1 - alpha) L(f_theta(T_xi*(x)), eta(y))
  s.t. xi* = argmin_xi sum L(f_theta(T_xi(x)), eta(y)), eta the backdoor label map.
- Stage 1 (Algorithm 1, ``stage1_epochs``): two copies of the generator, ``tgt`` (optimised)
  and ``atk`` (poisons f). Per batch: (i) one Adam step on tgt minimising
  L(f(T_tgt(x)), eta(y)) with f fixed; (ii) one step on f with the alpha-weighted loss using
  T_atk. At the end of every epoch atk <- tgt.
- Stage 2 (the remaining epochs): the generator is frozen and the classifier fine-tuned with
  the same alpha-weighted loss.
- Generator (CIFAR setting): 4 x [Conv4x4 s2 p1, BN, ReLU] with 16, 32, 64, 128 channels,
  mirrored with ConvTranspose4x4 s2 p1 (BN, ReLU) and a final Tanh.

Both stages run through :func:`bdbench.training.fit` with the objective as ``loss_fn``: in
stage 1 the loss function first takes step (i) with the generator's own optimizer, then
returns step (ii)'s loss for the classifier; ``after_epoch`` copies tgt into atk. The
generator is the attack's learned state (:meth:`state_dict`), cached with the attacked model.

Fidelity notes:
- eps is in normalised-input units, as in the paper's code: the trigger acts on [0, 1] pixels
  with a per-channel bound eps * std_c and clips to [0, 1], which is the reference's
  clip-to-the-normalised-range exactly. The generator sees normalised inputs.
- Step (i) evaluates f with its parameters fixed and its BatchNorm statistics untouched (a
  functional call on copies of its buffers, as the reference's temporary copy of the
  classifier), so only the tgt generator moves.
- Stage 2 fine-tunes the final stage-1 classifier with a fresh optimiser and the recipe's
  schedule; the official ``--test_use_train_best`` picks the best stage-1 epoch on *test*
  accuracy (an oracle), which bdbench does not do.
- Lengths: ``epochs`` (default: the preset's) is the total, ``stage1_epochs`` defaults to
  half of it, rounded up (BackdoorBench's default.yaml: 50 of 100); the classifier uses the
  run's recipe in both stages (official: SGD 0.01 and MultiStep in stage 2). Mixed precision
  is off.
- Images whose side is not a multiple of 16 (28 x 28) are zero-padded to one for the
  generator and its output cropped back (the official code has a dedicated MNIST
  autoencoder).
- LIRA has no poison ratio: every training sample is used clean and triggered. ``poison``
  returns a fixed dirty-label subset of round(rho N) samples at the run's ratio (the row's
  ``poison_count``, and what a ``poisoned_train_set`` defender sees), made with the trained
  (or restored) generator and rounded to uint8, which erases most of a sub-grey-level
  trigger; evaluation applies the trigger to float images (attack-cards LIRA (7)).
- The reference code counts target-class test images in its ASR; bdbench does not.
- Measured on the smoke preset (Fashion-MNIST subset, small CNN width 16, 4 epochs = 2 + 2,
  target 0, all-to-one; times on the shared, heavily loaded 2-core CPU): the paper's settings
  do **not** reach the floor: eps 0.01: ACC 0.474, ASR 0.607 (seed 0, 84 s). eps 0.05:
  ACC 0.623 / 0.703 / 0.528, ASR 0.954 / 0.623 / 0.936 (seeds 0-2); eps 0.1: 0.599 / 0.852 (seed 0);
  eps 0.05 with 2 + 4 epochs: 0.572 / 0.985 (seed 0). Clean accuracy is what suffers: half of
  the classifier's loss asks it to tell x from x + a perturbation of about one grey level
  (eps 0.01 is 0.0035 in [0, 1] here) and to send the latter to the target, and the
  generator's eval-mode output starts near zero (fresh BatchNorm statistics), so early on
  the two halves of the loss contradict each other; the reference trains 50 + 250 epochs.
  This matches the instability reported for LIRA's ports (BackdoorBench issue #43; the
  survey dropped LIRA for poor performance). The smoke test of the paper settings is an
  expected failure; the cache test uses eps 0.05.
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bdbench import Attack, Paper, hookimpl
from bdbench.components import DatasetInfo, ImageSet, LearnedTrigger, PoisonedSet
from bdbench.errors import ParameterError
from bdbench.params import param, positive, unit_interval
from bdbench.training import Recipe, fit


class Autoencoder(nn.Module):
    """g_xi: 4 strided 4x4 convolutions down, 4 transposed convolutions up, tanh; output in (-1, 1)."""

    def __init__(self, channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        enc: list[nn.Module] = []
        c = channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        dec: list[nn.Module] = []
        for w in reversed(widths[:-1]):
            dec += [nn.ConvTranspose2d(c, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        dec += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.multiple = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        out = self.decoder(self.encoder(x))
        return out[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


class LIRA(LearnedTrigger, Attack):
    """LIRA: learnable, imperceptible additive trigger (eps-bounded autoencoder output)."""

    name = "lira"
    threat_model = "training-control"
    paper = Paper(title="LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", venue="ICCV", year=2021,
                  url="https://openaccess.thecvf.com/content/ICCV2021/html/Doan_LIRA_Learnable_Imperceptible_and_Robust_Backdoor_Attacks_ICCV_2021_paper.html")

    @attrs.frozen(kw_only=True)
    class Config:
        label_mode: Literal["all-to-one", "all-to-all"] = param(
            "all-to-one", source="paper section 4 (all-to-one and all-to-all)")
        eps: float = param(0.01, source="official README commands, BackdoorBench and BackdoorBox (eps 0.01, "
                                        "normalised-input units)", check=positive)
        alpha: float = param(0.5, source="paper section 4 (alpha = beta = 0.5); official code alpha 0.5",
                             check=unit_interval)
        generator_lr: float = param(1e-4, source="official code and BackdoorBench (lr_atk 1e-4, Adam)",
                                    check=positive)
        epochs: int | None = param(
            None, source="None: the preset's recipe (stage 1 + stage 2); official CIFAR-10 50 + 250, "
                         "BackdoorBench 100 in total", check=positive)
        stage1_epochs: int | None = param(
            None, source="None: half of the epochs, rounded up (BackdoorBench default.yaml: "
                         "both_train_epochs 50 of epochs 100)", check=positive)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.net: Autoencoder | None = None  # g_xi (the tgt copy; atk during stage 1 is a copy of it)

    # -- generator and trigger --------------------------------------------------------------------------
    def prepare(self, dataset: DatasetInfo, train: ImageSet, ctx) -> None:
        self._device = ctx.device
        c = dataset.image_shape[0]
        self._mean = torch.tensor(dataset.mean, device=ctx.device).view(1, c, 1, 1)
        self._std = torch.tensor(dataset.std, device=ctx.device).view(1, c, 1, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=ctx.generator("lira-init"))))
            self.net = Autoencoder(c).to(ctx.device).eval()

    def trigger(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """T(x) = clip(x + eps * std * g((x - mean) / std), 0, 1): the bound is eps in normalised units."""
        net = self.net if net is None else net
        g = net((x - self._mean) / self._std)
        return (x + self.config.eps * self._std * g).clamp(0, 1)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("lira: prepare() builds the generator before apply()")
        self.net.eval()
        return self.trigger(images.to(self._device)).to(images.device)

    # -- training -------------------------------------------------------------------------------------------
    def stage_lengths(self, recipe: Recipe) -> tuple[int, int]:
        total = self.config.epochs or recipe.epochs
        first = self.config.stage1_epochs or math.ceil(total / 2)
        if first > total:
            raise ParameterError(f"lira: stage1_epochs {first} exceeds the {total} epochs in total")
        return first, total - first

    def train(self, model, train: ImageSet, poisoned: PoisonedSet, ctx) -> None:
        if ctx.target is None:
            raise ParameterError("lira: the run context must give the target")
        cfg = self.config
        if self.net is None:
            self.prepare(ctx.dataset, train, ctx)
        recipe = self.training_recipe(ctx, amp=False)
        stage1, stage2 = self.stage_lengths(recipe)
        target, k, alpha = ctx.target, ctx.dataset.num_classes, cfg.alpha

        def objective(net: nn.Module, x: torch.Tensor, y: torch.Tensor, atk: nn.Module) -> torch.Tensor:
            with torch.no_grad():
                x_bd = self.trigger(x, atk)
            return (alpha * F.cross_entropy(net(x), y)
                    + (1 - alpha) * F.cross_entropy(net(x_bd), self.backdoor_labels(y, target, k)))

        # Stage 1: alternate a generator step (tgt) and a classifier step (poisoned by atk).
        tgt = self.net.train()
        atk = copy.deepcopy(tgt).eval().requires_grad_(False)
        opt_t = torch.optim.Adam(tgt.parameters(), lr=cfg.generator_lr)

        def stage1_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            params = {n: p.detach() for n, p in net.named_parameters()}
            buffers = {n: b.clone() for n, b in net.named_buffers()}  # f's BN statistics stay untouched
            logits = functional_call(net, {**params, **buffers}, (self.trigger(x, tgt),))
            loss_t = F.cross_entropy(logits, self.backdoor_labels(y, target, k))
            grads = torch.autograd.grad(loss_t, list(tgt.parameters()))
            for p, g in zip(tgt.parameters(), grads):
                p.grad = g
            opt_t.step()
            return objective(net, x, y, atk)

        if stage1:
            fit(model, train, attrs.evolve(recipe, epochs=stage1), ctx, loss_fn=stage1_loss,
                after_epoch=lambda _: atk.load_state_dict(tgt.state_dict()),
                description="lira: stage 1 (classifier and generator)", stream="lira-stage1")
        self.net = tgt.eval().requires_grad_(False)

        # Stage 2: fine-tune the classifier against the frozen generator.
        if stage2:
            fit(model, train, attrs.evolve(recipe, epochs=stage2), ctx,
                loss_fn=lambda net, x, y: objective(net, x, y, self.net),
                description="lira: stage 2 (fine-tuning)", stream="lira-stage2")
        self.refresh_poisoned()

    # -- learned state (cached with the attacked model) -----------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.net is None else {f"generator.{k}": v for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.net is None:
            raise RuntimeError("lira: prepare() builds the generator before load_state_dict()")
        net = copy.deepcopy(self.net)
        net.load_state_dict({k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")})
        self.net = net.to(self._device).eval().requires_grad_(False)
        self.refresh_poisoned()


@hookimpl
def register_attacks(register):
    register(LIRA)
