from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import bd_models_survey
from bd_models_small.testing import check_contract, loss_drops, wrap
from bd_models_survey import EfficientNetB3, MobileNetV3Large, PreActResNet18, VGG19BN
from bdbench.nn import conv_bn_pairs, last_conv
from bdbench.plugins import make_plugin_manager

BUILDERS = [PreActResNet18, VGG19BN, EfficientNetB3, MobileNetV3Large]
SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]
SMALL = {"width": 0.25}


def test_registers_the_four_architectures() -> None:
    ps = make_plugin_manager(entrypoints=False, extra=[bd_models_survey], strict=True)
    assert [c.name for c in ps.list("model")] == ["efficientnet_b3", "mobilenet_v3_large", "preactresnet18",
                                                   "vgg19_bn"]
    assert ps.create("model", "vgg19_bn", {"width": "0.5", "pool_size": "1"}).config.pool_size == 1


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cls", BUILDERS, ids=lambda c: c.name)
def test_contract(cls: type, shape: tuple[int, int, int]) -> None:
    check_contract(cls.configure(SMALL), shape)


@pytest.mark.parametrize("cls", BUILDERS, ids=lambda c: c.name)
def test_loss_drops(cls: type) -> None:
    torch.manual_seed(0)
    model = wrap(cls.configure(SMALL).build(10, (3, 32, 32)), (3, 32, 32))
    before, after = loss_drops(model, (3, 32, 32))
    assert after < before


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_preactresnet18_pairs_skip_residual_sums(shape: tuple[int, int, int]) -> None:
    """Only the stem conv with layer1.0.bn1 and each block's conv1 with its bn2 are conv-BN pairs:
    every other bn1 is fed by a residual sum."""
    model = wrap(PreActResNet18.configure(SMALL).build(10, shape), shape)
    blocks = [f"net.layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    expected = [("net.conv1", "net.layer1.0.bn1")] + [(f"{b}.conv1", f"{b}.bn2") for b in blocks]
    assert sorted((c, b) for c, _, b, _ in conv_bn_pairs(model, shape)) == sorted(expected)


def test_preactresnet18_is_backdoorbenchs() -> None:
    with torch.device("meta"):
        net = PreActResNet18().build(10, (3, 32, 32))
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 11_171_146
    assert "layer2.0.shortcut.0.weight" in state and "layer1.0.shortcut.0.weight" not in state
    assert isinstance(net.final, nn.Identity)  # no BN-ReLU after layer4
    assert state["linear.weight"].shape == (10, 512)


@pytest.mark.parametrize(("cls", "reference"), [
    (VGG19BN, torchvision.models.vgg19_bn),
    (EfficientNetB3, torchvision.models.efficientnet_b3),
    (MobileNetV3Large, torchvision.models.mobilenet_v3_large),
], ids=lambda v: getattr(v, "name", ""))
def test_width_one_is_the_torchvision_network(cls: type, reference) -> None:
    with torch.device("meta"):
        ours = cls().build(10, (3, 32, 32)).state_dict()
        theirs = reference(weights=None, num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_vgg19_bn_structure() -> None:
    net = VGG19BN.configure(SMALL).build(10, (3, 32, 32))
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.features) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == 5
    shape = (3, 32, 32)
    assert last_conv(wrap(net, shape), shape)[0] == "net.features.49"  # BackdoorBench's NPD layer
    compact = VGG19BN.configure({**SMALL, "pool_size": 1}).build(10, (3, 32, 32))
    assert compact.classifier[0].in_features == 128
