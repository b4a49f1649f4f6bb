"""NC: Neural Cleanse, reverse-engineer a minimal trigger per class, flag outliers, unlearn them.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019 (sections 4 and 6).

1. Reverse engineering (sec. 4), for every label t: a mask m in [0, 1]^{1 x H x W}
   (shared by the channels) and a pattern p in [0, 1]^{C x H x W}, stamped in pixel space

       A(x, m, p) = (1 - m) * x + m * p,

   minimising  CE(f(A(x, m, p)), t) + lambda * |m|_1  over the defender's clean data D with the
   model frozen. m = tanh(m')/2 + 1/2 and p = tanh(p')/2 + 1/2 keep both in [0, 1]; Adam on
   (m', p') with lr 0.1 and betas (0.5, 0.9).
2. Dynamic lambda (the official schedule), once per epoch with s the epoch's attack success:
   lambda starts at 0 and is set to ``init_cost`` once s >= ``threshold`` for ``patience``
   epochs; after ``patience`` epochs with s >= threshold lambda <- lambda * c, after ``patience``
   epochs below it lambda <- lambda / c^1.5 (c = ``cost_multiplier``). The kept trigger is the
   one with the smallest |m|_1 among epochs with s >= threshold. Early stop once lambda has been
   raised and lowered and the best |m|_1 has not fallen below ``early_stop_threshold`` times
   its previous best for ``early_stop_patience`` epochs.
3. Detection (sec. 4): l_t = |m_t|_1, median l~, MAD = 1.4826 * median_t |l_t - l~|, anomaly
   index a_t = |l_t - l~| / MAD; t is flagged when l_t < l~ and a_t > 2.
4. Mitigation by unlearning (sec. 6, BackdoorBench): a fraction (20%) of D is stamped with the
   reversed trigger of each flagged label, keeping its true label, and the model is fine-tuned
   on that set (the other 80% unchanged plus one stamped copy per flagged label). Nothing
   flagged: the model is returned unchanged.

Fidelity notes:
- Reverse-engineering defaults follow BackdoorBench (``config/defense/nc``, which the survey ran):
  80 epochs per class, success threshold 0.98, early-stop threshold 0.99, patience 5, cost
  multiplier 2, init_cost 1e-3, mask lr 0.1; the official code (``bolunwang/backdoor``) gives
  the Adam betas (0.5, 0.9), batch 32, random initialisation of m and p, lambda reset to 0
  at the start (BackdoorBench starts at init_cost: ``reset_cost_to_zero=false``) and, when no
  epoch reaches the threshold, keeps the last trigger (``reached`` is false in diagnostics).
- As in the reference codes, an epoch's success and |m|_1 are averages over its mini-batches
  (the mask moves within the epoch); the kept trigger is the mask at the end of that epoch,
  and l_t is that mask's L1 norm.
- The model is frozen and in eval mode (BN running statistics) during the search, as in the
  official code; nothing of the model changes, so "nothing flagged" returns it bit-for-bit.
- The reversed trigger is kept as float tensors and stamped directly (BackdoorBench saves it
  as a min-max normalised PNG and reads it back, which changes it); the stamped unlearning
  images are rounded to uint8 like every image set (at most 0.5/255 per pixel).
- The stamped 20% is a random subset of D (BackdoorBench takes the last 20% of its random
  subset; our clean budget may be ordered by class). Unlearning uses BackdoorBench's
  fine-tuning recipe (100 epochs, SGD lr 0.01, cosine, batch 256, crop/flip) in train mode;
  the paper's variant (one epoch on 10% of the training data) is ``epochs=1``.
- The paper's other mitigations (input filtering, neuron pruning) are not implemented.
- The MAD's median of an even number of norms is the mean of the two middle values (numpy's,
  as in the official ``mad_outlier_detection.py``). MAD = 0 gives index 0 to norms at the
  median and infinity (reported as null) to the others.
- Measured (smoke preset: Fashion-MNIST subset, smallcnn width 16, BadNets 3x3 patch, target 0,
  spc 100, CPU). Plugin defaults (unlearning cut to 20 epochs): the target's trigger is by far the
  smallest (|m|_1 7.0 / 5.7 / 4.5 vs medians 64 / 56 / 56) but the clean labels' norms spread
  widely (about 28 to 115), so the MAD is large: seed 0 is NOT detected (index 1.69), seeds 1 and
  2 are (3.46, 2.38; ASR 0.99 -> 0.42 and 1.00 -> 0.28, ACC -0.02 and -0.05). With
  ``nc_epochs=30`` and lambda from init_cost at epoch 0 (BackdoorBench) and the full 100-epoch
  unlearning: seed 0 not detected (1.99); seed 1 index 3.87, ACC 0.845 -> 0.827, ASR 0.991 -> 0.125;
  seed 2 index 2.15, ACC 0.858 -> 0.825, ASR 0.999 -> 0.114 (about 78 s on an idle 2-core CPU).
"""
from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult, ImageSet, to_uint8
from bdbench.params import fraction, non_negative, param, positive, unit_interval
from bdbench.training import FineTuning, Recipe, fit
from bdbench.triggers import stamp

BB = "BackdoorBench config/defense/nc/cifar10.yaml"
OFFICIAL = "official bolunwang/backdoor visualizer.py"
MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation of a normal distribution (paper sec. 4)


def _to_tanh(values: torch.Tensor) -> torch.Tensor:
    """The tanh-space parameter whose transform tanh(v)/2 + 1/2 gives ``values`` in [0, 1]."""
    return torch.atanh(((values - 0.5) * 2).clamp(-1 + 1e-6, 1 - 1e-6))


class Trigger(nn.Module):
    """A candidate trigger: mask m (1 x H x W) and pattern p (C x H x W), both in [0, 1] by tanh."""

    def __init__(self, image_shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        c, h, w = image_shape
        self.mask_tanh = nn.Parameter(_to_tanh(torch.rand(1, h, w, generator=generator)))
        self.pattern_tanh = nn.Parameter(_to_tanh(torch.rand(c, h, w, generator=generator)))

    @property
    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_tanh) / 2 + 0.5

    @property
    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_tanh) / 2 + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x, m, p) = (1 - m) * x + m * p on [0, 1] images."""
        return stamp(x, self.mask, self.pattern)


@attrs.define
class CostSchedule:
    """The official dynamic lambda and early-stop rule, advanced once per epoch by :meth:`step`."""

    init_cost: float
    threshold: float
    patience: int
    multiplier: float
    early_stop_threshold: float
    early_stop_patience: int
    early_stop: bool = True
    cost: float = 0.0
    raised: bool = False
    lowered: bool = False
    _set: int = 0
    _up: int = 0
    _down: int = 0
    _stall: int = 0
    _stall_best: float = math.inf

    def step(self, success: float, best_norm: float) -> bool:
        """Update lambda after an epoch with attack success ``success``; True means stop now."""
        if self.early_stop:  # checked before lambda moves, as in the official loop
            if best_norm < math.inf:
                self._stall = self._stall + 1 if best_norm >= self.early_stop_threshold * self._stall_best else 0
            self._stall_best = min(best_norm, self._stall_best)
            if self.raised and self.lowered and self._stall >= self.early_stop_patience:
                return True
        ok = success >= self.threshold
        if self.cost == 0 and ok:
            self._set += 1
            if self._set >= self.patience:
                self.cost, self._up, self._down, self.raised, self.lowered = self.init_cost, 0, 0, False, False
        else:
            self._set = 0
        self._up, self._down = (self._up + 1, 0) if ok else (0, self._down + 1)
        if self._up >= self.patience:
            self._up, self.cost, self.raised = 0, self.cost * self.multiplier, True
        elif self._down >= self.patience:
            self._down, self.cost, self.lowered = 0, self.cost / self.multiplier ** 1.5, True
        return False


@attrs.frozen(kw_only=True, eq=False)
class ReversedTrigger:
    """The kept trigger of one label and how it was found."""

    label: int
    mask: torch.Tensor  # 1 x H x W, in [0, 1]
    pattern: torch.Tensor  # C x H x W, in [0, 1]
    reached: bool  # some epoch reached the success threshold
    success: float  # the epoch-average attack success of the kept trigger
    epochs: int
    cost: float  # lambda at the end

    @property
    def norm(self) -> float:
        return float(self.mask.abs().sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return stamp(x, self.mask, self.pattern)


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(a_t, median, MAD) with a_t = |l_t - median| / (1.4826 * median |l - median|)."""
    norms = norms.double()
    median = torch.quantile(norms, 0.5)
    deviation = (norms - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(deviation, 0.5)
    if mad > 0:
        index = deviation / mad
    else:
        index = torch.where(deviation > 0, torch.full_like(deviation, math.inf), torch.zeros_like(deviation))
    return index, float(median), float(mad)


def flag(norms: torch.Tensor, threshold: float) -> list[int]:
    """Labels whose norm is below the median with an anomaly index above ``threshold``."""
    index, median, _ = anomaly_indices(norms)
    return [t for t in range(len(norms)) if norms[t] < median and index[t] > threshold]


def unlearning_set(clean: ImageSet, triggers: list[ReversedTrigger], ratio: float,
                   generator: torch.Generator) -> tuple[ImageSet, int]:
    """D with a random ``ratio`` of it replaced by one stamped copy per trigger (true labels kept).

    Returns the set and the number of samples stamped per trigger.
    """
    order = torch.randperm(len(clean), generator=generator)
    k = round(ratio * len(clean))
    kept, part = clean.subset(order[k:]), clean.subset(order[:k])
    stamped = [ImageSet(to_uint8(t.apply(part.float())), part.labels.clone()) for t in triggers]
    return ImageSet.concat(kept, *stamped), k


class NC(Defense):
    """Neural Cleanse: reverse-engineer a minimal trigger per class, flag MAD outliers, unlearn their triggers."""

    name = "nc"
    needs = frozenset({"clean"})
    paper = Paper(title="Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
                  venue="IEEE S&P", year=2019,
                  url="https://doi.org/10.1109/SP.2019.00031")

    @attrs.frozen(kw_only=True)
    class Config(FineTuning):
        """Reverse engineering and detection; the inherited FineTuning fields are the unlearning stage."""

        nc_epochs: int = param(80, source=f"{BB} (nc_epoch)", help="trigger-search epochs per class",
                               check=positive)
        mask_lr: float = param(0.1, source=f"{BB} (mask_lr); {OFFICIAL} (lr 0.1)", check=positive)
        nc_batch_size: int = param(32, source=f"{OFFICIAL} (batch 32)", help="trigger-search batch size",
                                   check=positive)
        init_cost: float = param(1e-3, source=f"{BB} (init_cost); {OFFICIAL}", help="lambda once success holds",
                                 check=positive)
        threshold: float = param(0.98, source=f"{BB} (atk_succ_threshold 98%); official 0.99",
                                 help="attack success a reversed trigger must reach", check=unit_interval)
        patience: int = param(5, source=f"{BB} (patience); {OFFICIAL}", check=positive)
        cost_multiplier: float = param(2.0, source=f"{BB} (cost_multiplier); official example",
                                       help="lambda * c up, lambda / c^1.5 down", check=positive)
        early_stop: bool = param(True, source=f"{BB}; {OFFICIAL}")
        early_stop_threshold: float = param(0.99, source=f"{BB} (early_stop_threshold)", check=positive)
        early_stop_patience: int = param(25, source=f"{BB} (early_stop_patience); {OFFICIAL}", check=positive)
        reset_cost_to_zero: bool = param(True, source=f"{OFFICIAL} (reset_cost_to_zero)",
                                         help="lambda starts at 0 (false: at init_cost, as BackdoorBench)")
        anomaly_threshold: float = param(2.0, source="paper sec. 4; BackdoorBench (MAD threshold 2)",
                                         check=non_negative)
        unlearning_ratio: float = param(0.2, source="paper sec. 6 (20% stamped); BackdoorBench unlearning_ratio",
                                        check=fraction)

    def schedule(self) -> CostSchedule:
        c = self.config
        return CostSchedule(init_cost=c.init_cost, threshold=c.threshold, patience=c.patience,
                            multiplier=c.cost_multiplier, early_stop_threshold=c.early_stop_threshold,
                            early_stop_patience=c.early_stop_patience, early_stop=c.early_stop,
                            cost=0.0 if c.reset_cost_to_zero else c.init_cost)

    def reverse_engineer(self, model: nn.Module, clean: ImageSet, label: int, ctx) -> ReversedTrigger:
        """Steps 1-2 for one label: the smallest-mask trigger sending D to ``label`` (model frozen)."""
        c = self.config
        trigger = Trigger(clean.shape, ctx.generator(f"nc: init {label}")).to(ctx.device)
        optimizer = torch.optim.Adam(trigger.parameters(), lr=c.mask_lr, betas=(0.5, 0.9))
        schedule = self.schedule()
        stats = {"hits": 0, "seen": 0, "norm": 0.0, "batches": 0}

        def loss_fn(net, x, y):
            net.eval()  # frozen model, BN running statistics
            logits = net(trigger(x))
            target = torch.full_like(y, label)
            norm = trigger.mask.abs().sum()
            stats["hits"] += int((logits.argmax(1) == target).sum())
            stats["seen"] += len(y)
            stats["norm"] += float(norm.detach())
            stats["batches"] += 1
            return F.cross_entropy(logits, target) + schedule.cost * norm

        recipe = Recipe(epochs=1, batch_size=c.nc_batch_size, lr=c.mask_lr, optimizer="adam", weight_decay=0.0,
                        schedule="constant", amp=False)
        best, best_norm, success, epochs = None, math.inf, 0.0, 0
        for epoch in range(c.nc_epochs):
            stats.update(hits=0, seen=0, norm=0.0, batches=0)
            fit(model, clean, recipe, ctx, loss_fn=loss_fn, params=trigger.parameters(), optimizer=optimizer,
                description=f"nc: reverse engineering label {label}", stream=f"nc: {label} {epoch}")
            epochs += 1
            epoch_success, epoch_norm = stats["hits"] / max(stats["seen"], 1), stats["norm"] / max(stats["batches"], 1)
            if epoch_success >= c.threshold and epoch_norm < best_norm:
                best_norm, success = epoch_norm, epoch_success
                best = (trigger.mask.detach().cpu().clone(), trigger.pattern.detach().cpu().clone())
            if schedule.step(epoch_success, best_norm):
                break
        reached = best is not None
        if not reached:  # official: keep the last trigger
            best = (trigger.mask.detach().cpu().clone(), trigger.pattern.detach().cpu().clone())
            success = epoch_success
        return ReversedTrigger(label=label, mask=best[0], pattern=best[1], reached=reached, success=success,
                               epochs=epochs, cost=schedule.cost)

    def purify(self, model, data, ctx) -> DefenseResult:
        c = self.config
        model.eval()
        # fit() freezes the model while each trigger (its only parameters) is optimised
        triggers = [self.reverse_engineer(model, data.clean, label, ctx) for label in range(data.num_classes)]
        model.eval()
        norms = torch.tensor([t.norm for t in triggers])
        index, median, mad = anomaly_indices(norms)
        flagged = flag(norms, c.anomaly_threshold)
        diagnostics = {
            "detected": bool(flagged), "flagged": flagged,
            "l1_norms": [round(t.norm, 4) for t in triggers],
            "anomaly_index": [round(float(a), 4) if math.isfinite(a) else None for a in index.tolist()],
            "median": round(median, 4), "mad": round(mad, 4),
            "reached": [t.reached for t in triggers], "success": [round(t.success, 4) for t in triggers],
            "epochs": [t.epochs for t in triggers], "final_cost": [t.cost for t in triggers],
        }
        if not flagged:
            ctx.reporter.log("nc: no label flagged; the model is returned unchanged")
            return DefenseResult(model=model, diagnostics=diagnostics | {
                "unlearned": False, "note": "no label flagged: model returned unchanged (no defense applied)"})
        chosen = [triggers[t] for t in flagged]
        unlearn, stamped = unlearning_set(data.clean, chosen, c.unlearning_ratio, ctx.generator("nc: unlearning"))
        fit(model, unlearn, c.recipe(ctx.dataset.hflip), ctx, description="nc: unlearning")
        return DefenseResult(model=model, diagnostics=diagnostics | {
            "unlearned": True, "unlearning_samples": len(unlearn), "stamped_per_label": stamped})


@hookimpl
def register_defenses(register):
    register(NC)
