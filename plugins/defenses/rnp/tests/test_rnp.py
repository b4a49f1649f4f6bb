"""RNP: unlearning drops clean accuracy to the threshold, the masks recover it, the threshold is
chosen on the validation split; it runs on the survey's architectures; a smoke run against BadNets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bd_defense_rnp import RNP
from bdbench.components import DatasetInfo, DefenseData, ImageSet
from bdbench.errors import BdbenchError
from bdbench.masking import NeuronMasks
from bdbench.nn import NormalizedModel
from bdbench.testing import defense_data, make_context
from bdbench.training import accuracy


def test_unlearning_lowers_clean_accuracy_below_the_threshold_then_the_masks_restore_it(
        tiny_model, tiny_dataset, run_context):
    # 4 classes: chance is 0.25, so CA_min is 0.3 here (0.2 of the paper is for 10 classes)
    defense = RNP.configure({"batch_size": 16, "clean_threshold": 0.3, "recovering_epochs": 10})
    data = defense_data(defense, tiny_dataset, run_context)
    acc_0 = accuracy(tiny_model, data.clean, device=run_context.device)
    unlearned, diag = defense.unlearn(tiny_model, data, run_context)
    assert acc_0 > 0.9
    assert diag["unlearning_acc"][-1] <= 0.3 and all(a > 0.3 for a in diag["unlearning_acc"][:-1])
    acc_unlearned = accuracy(unlearned, data.clean, device=run_context.device)
    assert acc_unlearned <= 0.35
    learned = defense.recover(unlearned, data, run_context)
    assert learned.min() >= 0 and learned.max() <= 1 and learned.min() < 1
    masks = NeuronMasks(unlearned)
    masks.set(learned)
    # masks alone restore only part of the accuracy on this 24-channel net: measured 0.25 -> 0.31
    assert accuracy(unlearned, data.clean, device=run_context.device) >= acc_unlearned + 0.05
    # the original model was not touched by unlearning
    assert accuracy(tiny_model, data.clean, device=run_context.device) == acc_0


def test_threshold_is_the_largest_within_acc_ratio_on_the_validation_split(tiny_model, tiny_dataset, run_context,
                                                                           monkeypatch):
    import bd_defense_rnp

    calls = []
    real = bd_defense_rnp.accuracy

    def spy(model, data, **kw):
        acc = real(model, data, **kw)
        calls.append((data, acc))
        return acc

    defense = RNP.configure({"batch_size": 16, "recovering_epochs": 5, "acc_ratio": 0.05})
    data = defense_data(defense, tiny_dataset, run_context)
    monkeypatch.setattr(bd_defense_rnp, "accuracy", spy)
    result = defense.purify(tiny_model, data, run_context)
    selection = [(d, a) for d, a in calls if d is data.val]
    assert len(selection) == 1 + 19 and all(d is data.val or d is data.clean for d, _ in calls)
    acc_0, grid = selection[0][1], [round(0.05 * i, 10) for i in range(19)]
    ok = [t for t, (_, acc) in zip(grid, selection[1:], strict=True) if (acc_0 - acc) / acc_0 < 0.05]
    diag = result.diagnostics
    assert diag["chosen"] == pytest.approx(max(ok, default=0.0))
    bns = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(int((bn.weight == 0).sum()) for bn in bns) >= diag["pruned"]


def test_fixed_pruning_value(tiny_model, tiny_dataset, run_context):
    defense = RNP.configure({"batch_size": 16, "recovering_epochs": 3, "pruning_by": "number", "pruning_value": 0.25})
    diag = defense.purify(tiny_model, defense_data(defense, tiny_dataset, run_context), run_context).diagnostics
    assert diag["pruned"] == int(0.25 * diag["neurons"]) and diag["chosen"] == 0.25


def test_needs_batchnorm(tiny_dataset, run_context):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(BdbenchError, match="rnp needs BatchNorm2d"):
        RNP().purify(model, defense_data(RNP(), tiny_dataset, run_context), run_context)


SURVEY = [("smallcnn", {"width": 4}), ("preactresnet18", {"width": 0.125}), ("vgg19_bn", {"width": 0.125}),
          ("efficientnet_b3", {"width": 0.25}), ("mobilenet_v3_large", {"width": 0.25})]


@pytest.mark.parametrize("name, params", SURVEY)
def test_runs_on_the_survey_architectures(plugins, name, params):
    info = DatasetInfo(name="rand", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(0)
    net = plugins.get("model", name).cls.configure(params).build(10, info.image_shape)
    model = NormalizedModel(net, info.mean, info.std).eval()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean = ImageSet(images, torch.arange(40) % 10)
    data = DefenseData(num_classes=10, image_shape=info.image_shape, clean=clean, val=clean)
    diag = RNP.configure({"unlearning_epochs": 2, "recovering_epochs": 1, "batch_size": 20}).purify(
        model, data, make_context(info)).diagnostics
    assert diag["neurons"] == sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "RNP fails on the smoke model: the recovering step zeroes most channels of smallcnn's final BN "
    "(49 of 64 at seed 0), so every threshold costs > 10% validation accuracy and none is chosen; "
    "ASR unchanged (seeds 0/1/2: 0.996/0.991/0.999)"))
def test_smoke_badnets(smoke_run):
    # Paper/official defaults. Measured on the smoke preset, badnets, spc 100 (ACC / ASR before -> after):
    #   seed 0: 0.834 -> 0.834 / 0.996 -> 0.996, nothing pruned (val acc 0.87 unpruned, 0.44-0.56 at
    #           threshold 0, where the 52 zero masks go); 17 s. Unlearning: 4 epochs, running acc
    #           0.87, 0.73, 0.35, 0.11; backdoor label estimate 0 (the true target).
    #   seed 1: 0.845 -> 0.845 / 0.991 -> 0.991, nothing pruned (val 0.89 -> 0.44 at threshold 0); 16 s.
    #   seed 2: 0.858 -> 0.858 / 0.999 -> 0.999, nothing pruned (val 0.92 -> 0.28 at threshold 0); 53 s.
    # With the test set as an oracle (analysis only) seed 0 reaches ASR 0 at threshold 0.15, at ACC 0.33.
    # spc 50 (the paper's 1% of CIFAR-10 in size) gives the same picture (ACC 0.52 at ASR 0).
    row = smoke_run("rnp", attack="badnets", spc=100)
    assert row["status"] == "ok", row["error"]
    assert row["asr_before"] - row["asr_after"] >= 0.3
    assert row["acc_after"] >= row["acc_before"] - 0.1
