"""NPD: the polarizer starts as the identity and sits where the reference puts it on each
architecture; only it is trained; a smoke run against BadNets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bd_defense_npd import NPD, Polarized, insert_polarizer, polarizer_site
from bdbench.components import DatasetInfo, DefenseData, ImageSet
from bdbench.errors import BdbenchError
from bdbench.nn import NormalizedModel
from bdbench.testing import defense_data, make_context

# (model, params, expected site): the survey fork's target layers, BackdoorBench's block for PreAct-ResNet18
SITES = [
    ("smallcnn", {"width": 4}, "net.layer3.0.conv2"),
    ("preactresnet18", {"width": 0.125}, "net.layer4.1.conv2"),
    ("vgg19_bn", {"width": 0.125}, "net.features.49"),
    ("mobilenet_v3_large", {"width": 0.25}, "net.features.16.0"),
    ("efficientnet_b3", {"width": 0.25}, "net.features.8.0"),
]
INFO = DatasetInfo(name="rand", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)


def build(plugins, name, params):
    torch.manual_seed(0)
    net = plugins.get("model", name).cls.configure(params).build(10, INFO.image_shape)
    return NormalizedModel(net, INFO.mean, INFO.std).eval()


@pytest.mark.parametrize("name, params, site", SITES)
def test_polarizer_is_inserted_before_the_last_conv_and_starts_as_identity(plugins, name, params, site):
    model = build(plugins, name, params)
    target = model.get_submodule(site)
    x = torch.rand(4, *INFO.image_shape)
    with torch.no_grad():
        before = model(x)
    where, polarizer = insert_polarizer(model, INFO.image_shape)
    assert where == site
    wrapper = model.get_submodule(site)
    assert isinstance(wrapper, Polarized) and wrapper.layer is target and wrapper.where == "input"
    assert polarizer.conv.in_channels == polarizer.conv.out_channels == target.in_channels
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before, rtol=1e-5, atol=1e-6)


def test_other_sites(plugins):
    model = build(plugins, "preactresnet18", {"width": 0.125})
    assert polarizer_site(model, INFO.image_shape, "layer4.1.conv1")[:2] == ("net.layer4.1.conv1", "input")
    name, where, channels = polarizer_site(model, INFO.image_shape, "features")
    assert (name, where, channels) == ("net.layer4.1", "output", 64)
    with pytest.raises(BdbenchError, match="no module named"):
        polarizer_site(model, INFO.image_shape, "layer9")


def test_only_the_polarizer_is_trained(tiny_model, tiny_dataset, run_context):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    defense = NPD.configure({"epochs": 2, "warm_epochs": 1, "batch_size": 32, "lr": 0.05})
    result = defense.purify(tiny_model, defense_data(defense, tiny_dataset, run_context), run_context)
    after = result.model.state_dict()
    site = result.diagnostics["site"]
    for key, value in before.items():  # every original tensor, now under the wrapper's "layer"
        moved = key.replace(site + ".", site + ".layer.") if key.startswith(site + ".") else key
        assert torch.equal(after[moved], value), key
    polarizer = result.model.get_submodule(site).polarizer
    assert not torch.equal(polarizer.conv.weight.view(polarizer.conv.out_channels, -1),
                           torch.eye(polarizer.conv.in_channels))
    assert 0 <= result.diagnostics["adv_reached_target"] <= 1


@pytest.mark.parametrize("name, params, site", SITES[1:])
def test_runs_on_the_survey_architectures(plugins, name, params, site):
    model = build(plugins, name, params)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean = ImageSet(images, torch.arange(40) % 10)
    data = DefenseData(num_classes=10, image_shape=INFO.image_shape, clean=clean)
    result = NPD.configure({"epochs": 1, "warm_epochs": 1, "batch_size": 20}).purify(model, data, make_context(INFO))
    assert result.diagnostics["site"] == site
    assert torch.isfinite(result.model(torch.rand(2, *INFO.image_shape))).all()


@pytest.mark.slow
def test_smoke_badnets(smoke_run):
    # 20 epochs + 2 warm-up instead of BackdoorBench's 50 + 5, to fit the smoke budget (the rest are
    # the defaults). Measured on the smoke preset, badnets, spc 100 (ACC / ASR before -> after, RA,
    # defense seconds on the shared 2-core CPU at load 5-12):
    #   seed 0: 0.834 -> 0.819 / 0.996 -> 0.407, RA 0.542, 119 s
    #   seed 1: 0.845 -> 0.816 / 0.991 -> 0.214, RA 0.664, 120 s
    #   seed 2: 0.858 -> 0.821 / 0.999 -> 0.191, RA 0.676, 51 s
    # Full defaults, seed 0: 0.834 -> 0.807 / 0.996 -> 0.223 (157 s); 10 + 2 epochs: ASR 0.654;
    # 10 + 2 epochs with layer=features: ASR 0.781.
    row = smoke_run("npd", attack="badnets", spc=100, defense_params={"epochs": 20, "warm_epochs": 2})
    assert row["status"] == "ok", row["error"]
    assert row["asr_before"] - row["asr_after"] >= 0.45
    assert row["acc_after"] >= row["acc_before"] - 0.07
