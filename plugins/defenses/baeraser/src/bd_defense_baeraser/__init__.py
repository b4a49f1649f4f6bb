"""BAERASER: recover the trigger distribution with a max-entropy generator, then unlearn it by gradient ascent.

Liu, Fan, Chen, Liu, Ma, Wang, Ma, "Backdoor Defense with Machine Unlearning", IEEE INFOCOM 2022,
arXiv:2201.09538 (the paper calls the method BAERASE / BaEraser). The defender knows the target
label y_t and the trigger's size and region (``DefenseData.trigger_hint``).

1. Trigger pattern recovery: MESA's max-entropy generator for y_t (one sub-model, beta 0.5),

       min_G -E_{x,z}[ min(p(y_t | x (+) G(z)), beta) ] - alpha * I_hat(z; G(z))   (MINE estimate),

   shared with MESA in :mod:`bdbench.synthesis`.
2. Unlearning by gradient ascent on the recovered triggers, descent on the clean data, and a
   penalty that keeps every layer near its original weights theta^0 (survey eq. 26):

       min_theta  lambda1 * CE(f(x), y) - CE(f(x (+) G(z)), y_t) + lambda2 * sum_l w_l ||theta_l - theta_l^0||_1

   with w_l = 1 (the reference code: lambda1 = 100, lambda2 = 1e-6, SGD lr 1e-4, momentum 0.9,
   at most 10 epochs), every image of the batch stamped with its own generated trigger.
3. The ascent term is unbounded, so unlearning is stopped and selected on the defender's data
   only: after each epoch, the success of the generated triggers and the accuracy are measured
   on the validation split; unlearning stops once the triggers no longer reach y_t (success <
   ``stop_success``, the reference's 0.05%), and the kept model is the epoch (0 = the input
   model) with the lowest trigger success among those whose validation accuracy is within
   ``max_acc_drop`` (relative) of the start.

Fidelity notes:
- The reference (``fmy266/Pytorch-Backdoor-Unlearning``, incomplete by its README) stops when the
  ASR of the REAL trigger on the TEST set is below 0.05% (a leak, checked after every step). We
  measure the GENERATED triggers on the validation split (10% of the budget) after every epoch,
  and add the accuracy guard the survey asks for (an unbounded ascent otherwise destroys the model).
  A first version stopped at the first epoch over the accuracy guard; with 100 validation images
  the accuracy is noisy (seed 1 stopped at epoch 2, ASR 0.991 -> 0.893), so the guard selects
  among epochs instead of stopping.
- The paper's "dynamic" layer-wise penalty weights w_l could not be checked against the paper
  text [unverified]; the reference code's form (uniform weights, L1 distance, 1e-6) is used.
  The reference's penalty loop zips the model objects instead of their parameters (a bug: it adds
  nothing); ours sums over parameters.
- Generator defaults: MESA's (see ``bdbench.synthesis.MaxEntropy``); the reference uses hidden
  2048 and beta 0.5 (0.8 and 0.9 mentioned). Trigger: round(3 * H / 32) px at a random position
  inside the hint box (reference: 3x3 at a random position of the image).
- Unlearning runs in train mode (BN batch statistics), as the reference; weight decay 0 (reference).
- Diagnostics: target, hint box, generator losses, trigger success of the generated triggers on
  the validation split per epoch, validation accuracy per epoch, the kept epoch, why it stopped.
- Measured with the defaults (smoke preset: Fashion-MNIST subset, smallcnn width 16, BadNets 3x3
  corner patch, target 0, spc 100 = 900 training + 100 validation images), ASR / ACC before ->
  after (kept epoch): seed 0: 0.996 -> 0.222 / 0.834 -> 0.799 (9); seed 1: 0.991 -> 0.284 /
  0.845 -> 0.814 (10); seed 2: 0.999 -> 0.409 / 0.858 -> 0.818 (6). The generated triggers'
  success on the validation split fell from 0.94-0.98 to 0.03-0.10 while the real trigger kept
  0.2-0.4: the recovered triggers cover the real one only partly, and the 0.05% stop never fired
  within 10 epochs of 8 steps (the reference's 2,500 images give 20 steps per epoch). The paper
  reports a ~99% ASR reduction on its data; here it is 59-78%.
"""
from __future__ import annotations

import copy

import attrs
import torch
import torch.nn.functional as F

from bdbench import Defense, Paper, hookimpl
from bdbench.components import DefenseResult
from bdbench.params import non_negative, param, positive, unit_interval
from bdbench.synthesis import (
    MaxEntropy,
    TriggerGenerator,
    check_box,
    check_target,
    place,
    train_generator,
    trigger_success,
)
from bdbench.training import Recipe, accuracy, fit

CODE = "reference code fmy266/Pytorch-Backdoor-Unlearning unlearning_backdoor.py"


def penalty(params: list[torch.nn.Parameter], originals: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||theta_l - theta_l^0||_1 over the model's parameters."""
    return sum((p - p0).abs().sum() for p, p0 in zip(params, originals, strict=True))


class BAERASER(Defense):
    """BAERASER: max-entropy trigger recovery for the known target, then gradient-ascent unlearning."""

    name = "baeraser"
    needs = frozenset({"clean", "target_label", "trigger_hint"})
    uses_validation = True
    paper = Paper(title="Backdoor Defense with Machine Unlearning", venue="IEEE INFOCOM", year=2022,
                  arxiv="2201.09538")

    @attrs.frozen(kw_only=True)
    class Config(MaxEntropy):
        """The inherited MaxEntropy fields train the generator; the rest is the unlearning stage."""

        beta: float = param(0.5, source=f"{CODE} (search_param beta 0.5)", help="generator confidence threshold",
                            check=unit_interval)
        epochs: int = param(10, source=f"{CODE} (10 epochs, following NAD)", help="at most", check=positive)
        lr: float = param(1e-4, source=f"{CODE} (SGD lr 1e-4)", check=positive)
        momentum: float = param(0.9, source=f"{CODE} (momentum 0.9)", check=non_negative)
        weight_decay: float = param(0.0, source=f"{CODE} (weight_decay 0)", check=non_negative)
        batch_size: int = param(128, source=f"{CODE} (generator batch 128)", check=positive)
        lambda1: float = param(100.0, source=f"{CODE} (alpha 100 on the clean loss)", check=non_negative)
        lambda2: float = param(1e-6, source=f"{CODE} (1e-6 * sum |theta - theta0|)", check=non_negative)
        stop_success: float = param(0.0005, source=f"{CODE} (stop when ASR < 0.05%); measured on the "
                                    "generated triggers and the validation split", check=unit_interval)
        max_acc_drop: float = param(0.1, source="ours: defender-side guard (like FP's acc_ratio 0.1)",
                                    help="relative validation-accuracy drop beyond which an epoch cannot be kept",
                                    check=unit_interval)

    def recover(self, model, data, ctx) -> tuple[TriggerGenerator, dict]:
        """Step 1: the max-entropy generator of triggers for the target."""
        c = self.config
        box = check_box(data.trigger_hint, data.image_shape)
        target = check_target(data.target, data.num_classes)
        G, history = train_generator(model, data.clean, target=target, box=box, beta=c.beta, config=c,
                                     ctx=ctx, stream="baeraser: G")
        return G, history.summary()

    def unlearn(self, model, G: TriggerGenerator, data, ctx) -> dict:
        """Steps 2-3: gradient ascent on generated triggers, descent on clean data, penalty, early stop."""
        c = self.config
        target, box = check_target(data.target, data.num_classes), check_box(data.trigger_hint, data.image_shape)
        val = data.val if data.val is not None and len(data.val) else data.clean
        params = [p for p in model.parameters() if p.requires_grad]
        originals = [p.detach().clone() for p in params]
        rng = ctx.generator("baeraser: unlearning")
        check = ctx.generator("baeraser: check")
        terms = {"clean": 0.0, "ascent": 0.0, "penalty": 0.0, "n": 0}

        def loss_fn(net, x, y):
            clean = F.cross_entropy(net(x), y)
            triggered = place(x, G.sample(len(x), rng), box, rng)
            ascent = F.cross_entropy(net(triggered), torch.full_like(y, target))
            reg = penalty(params, originals)
            for key, value in (("clean", clean), ("ascent", ascent), ("penalty", reg)):
                terms[key] += float(value.detach())
            terms["n"] += 1
            return c.lambda1 * clean - ascent + c.lambda2 * reg

        recipe = Recipe(epochs=1, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, schedule="constant", amp=False)
        opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        acc0 = accuracy(model, val, device=ctx.device)
        success = [trigger_success(model, val, G, target=target, box=box, device=ctx.device, rng=check)]
        accs, losses, stop = [acc0], [], "epochs"
        best = {"epoch": 0, "success": success[0], "state": copy.deepcopy(model.state_dict())}
        if success[0] < c.stop_success:
            stop = "no generated trigger reaches the target"
        for epoch in range(c.epochs if stop == "epochs" else 0):
            terms.update(clean=0.0, ascent=0.0, penalty=0.0, n=0)
            fit(model, data.clean, recipe, ctx, loss_fn=loss_fn, params=params, optimizer=opt,
                description=f"baeraser: unlearning epoch {epoch + 1}", stream=f"baeraser: {epoch}")
            losses.append({k: round(terms[k] / max(terms["n"], 1), 5) for k in ("clean", "ascent", "penalty")})
            acc = accuracy(model, val, device=ctx.device)
            rate = trigger_success(model, val, G, target=target, box=box, device=ctx.device, rng=check)
            accs.append(acc)
            success.append(rate)
            kept = acc0 <= 0 or (acc0 - acc) / acc0 <= c.max_acc_drop
            if kept and rate <= best["success"]:
                best = {"epoch": epoch + 1, "success": rate, "state": copy.deepcopy(model.state_dict())}
            if kept and rate < c.stop_success:
                stop = f"generated triggers erased at epoch {epoch + 1}"
                break
        model.load_state_dict(best["state"])
        model.eval()
        return {"epochs_run": len(losses), "stopped": stop, "selected_epoch": best["epoch"], "loss_terms": losses,
                "val_accuracy": [round(a, 4) for a in accs], "val_trigger_success": [round(s, 4) for s in success]}

    def purify(self, model, data, ctx) -> DefenseResult:
        model.to(ctx.device).eval()
        box = check_box(data.trigger_hint, data.image_shape)
        G, generator = self.recover(model, data, ctx)
        unlearning = self.unlearn(model, G, data, ctx)
        return DefenseResult(model=model, diagnostics={
            "target": int(data.target), "trigger_hint": list(box), "trigger_shape": list(G.trigger_shape),
            "generator": generator, **unlearning})


@hookimpl
def register_defenses(register):
    register(BAERASER)
