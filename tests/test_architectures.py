"""Every installed defense on every survey architecture (small widths, 3x32x32), and a clear
error where a defense needs BatchNorm the model lacks.

The survey runs each defense on PreAct-ResNet18, VGG-19-BN, EfficientNet-B3 and MobileNetV3-Large;
a defense that finds its layers by name or by one architecture's layout breaks on the others.
Each case purifies a randomly initialised model on 40 random images with one epoch (or round)
of everything and checks what must hold on any architecture: a defense that always trains
changed the model, none left hooks, masks or parametrizations behind (but FP's pruning mask
and MM-BD's bounds, which are forward hooks), the state dict keeps its keys (but NPD's
polarizer) and reloads, and the logits are finite.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bdbench import triggers
from bdbench.components import DatasetInfo, DefenseData, ImageSet
from bdbench.errors import BdbenchError
from bdbench.nn import NormalizedModel
from bdbench.testing import make_context

INFO = DatasetInfo(name="rand", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
MODELS = [("smallcnn", {"width": 4}), ("preactresnet18", {"width": 0.125}), ("vgg19_bn", {"width": 0.125}),
          ("efficientnet_b3", {"width": 0.25}), ("mobilenet_v3_large", {"width": 0.25})]
ONE_PASS = {  # the least work that still runs every step of each algorithm
    "anp": {"iterations": 2}, "awm": {"epochs": 1, "inner": 1}, "bcu": {"epochs": 1},
    "baeraser": {"gen_epochs": 1, "epochs": 1}, "mesa": {"gen_epochs": 1, "epochs": 1},
    "burn": {"iterations": 1, "epochs": 1, "max_iter": 10}, "fp": {"epochs": 1}, "fst": {"epochs": 1},
    "ft": {"epochs": 1}, "ftsam": {"epochs": 1}, "gradprune": {"max_epochs": 1, "max_rounds": 2},
    "ibau": {"n_rounds": 1, "K": 1}, "mmbd": {"detect_images": 2, "detect_steps": 3, "epochs": 1},
    "nad": {"epochs": 1, "teacher_epochs": 1}, "nc": {"epochs": 1, "nc_epochs": 1}, "nft": {"epochs": 1},
    "npd": {"epochs": 1, "warm_epochs": 1}, "pbe": {"epochs": 1, "steps": 1},
    "rnp": {"unlearning_epochs": 1, "recovering_epochs": 1}, "sau": {"n_rounds": 1, "adv_steps": 1},
}
NEEDS_BATCHNORM = {"anp", "bnp", "clp", "nft", "rnp"}  # they act on BatchNorm layers
ADDS_MODULES = {"npd"}  # the neural polarizer is a new layer of the purified model
# FP's pruning mask and MM-BD's activation bounds are forward hooks on the returned model.
HOOKS = {"fp", "mmbd"}
# Always train or bound something; the others select (prune, keep an epoch, mitigate a detection)
# and may rightly return the model unchanged from one pass on random data.
ALWAYS_CHANGE = {"ft", "fp", "fst", "ftsam", "nad", "bcu", "sau", "pbe", "ibau", "npd", "nft", "awm"}


def defenses(plugins) -> list[str]:
    return [i.name for i in plugins.list("defense", exclude="none")]


def data_for(defense, n: int = 40) -> DefenseData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *INFO.image_shape), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % INFO.num_classes
    clean = ImageSet(images, labels)
    box = triggers.corner_box(INFO.image_shape, 3)
    fields: dict = {}
    if "clean" in defense.needs:
        fields.update(clean=clean, val=clean)
    if "poisoned_train_set" in defense.needs:
        fields["poisoned_train"] = clean
    if "trigger_oracle" in defense.needs:
        mask, pattern = triggers.corner_patch(INFO.image_shape)
        fields["trigger"] = lambda x: triggers.stamp(x, mask, pattern)
    if "target_label" in defense.needs:
        fields["target"] = 0
    if "trigger_hint" in defense.needs:
        fields["trigger_hint"] = box
    return DefenseData(num_classes=INFO.num_classes, image_shape=INFO.image_shape, **fields)


def build(plugins, name: str, params: dict) -> nn.Module:
    torch.manual_seed(0)
    net = plugins.get("model", name).cls.configure(params).build(INFO.num_classes, INFO.image_shape)
    return NormalizedModel(net, INFO.mean, INFO.std).eval()


def leftovers(model: nn.Module) -> list[str]:
    found = [f"{n}: forward hooks" for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    found += [k for k in model.state_dict() if "parametrizations" in k or "mask" in k.rsplit(".", 1)[-1]]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("model_name, model_params", MODELS, ids=[m for m, _ in MODELS])
def test_every_defense_runs_on_the_survey_architecture(plugins, model_name, model_params):
    failures = []
    for name in defenses(plugins):
        cls = plugins.get("defense", name).cls
        defense = cls.configure(ONE_PASS.get(name, {}))
        model = build(plugins, model_name, model_params)
        before = copy.deepcopy(model.state_dict())
        x = torch.rand(8, *INFO.image_shape)
        with torch.no_grad():
            out_before = model(x)
        try:
            result = defense.purify(model, data_for(defense), make_context(INFO))
        except Exception as exc:  # collect, so one run reports every broken pair
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        purified = result.model.eval()
        with torch.no_grad():
            out = purified(x)
        state = purified.state_dict()
        changed = (set(state) != set(before) or any(not torch.equal(state[k], before[k]) for k in before)
                   or not torch.allclose(out, out_before))
        problems = []
        if out.shape != (8, INFO.num_classes) or not torch.isfinite(out).all():
            problems.append(f"logits {tuple(out.shape)}, finite {bool(torch.isfinite(out).all())}")
        if not changed and name in ALWAYS_CHANGE:
            problems.append("the model is unchanged")
        if leftovers(purified) and name not in HOOKS:
            problems.append(f"left behind {leftovers(purified)[:3]}")
        if name not in ADDS_MODULES and set(state) != set(before):
            problems.append(f"state dict keys changed: {sorted(set(state) ^ set(before))[:3]}")
        try:
            purified.load_state_dict(state)
        except Exception as exc:
            problems.append(f"does not reload its state dict: {exc}")
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    assert not failures, f"on {model_name}:\n" + "\n".join(failures)


class NoBatchNorm(nn.Module):
    """conv-ReLU x2, global average pooling, linear: the timm interface without any BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, INFO.num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f, pre_logits: bool = False):
        f = f.mean(dim=(2, 3))
        return f if pre_logits else self.fc(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc


@pytest.mark.parametrize("name", sorted(NEEDS_BATCHNORM))
def test_a_defense_that_needs_batchnorm_says_so_on_a_model_without_it(plugins, name):
    defense = plugins.get("defense", name).cls.configure(ONE_PASS.get(name, {}))
    torch.manual_seed(0)
    model = NormalizedModel(NoBatchNorm(), INFO.mean, INFO.std).eval()
    with pytest.raises(BdbenchError, match="BatchNorm"):
        defense.purify(model, data_for(defense), make_context(INFO))
