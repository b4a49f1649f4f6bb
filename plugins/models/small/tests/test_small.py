from __future__ import annotations

import pytest
import torch

import bd_models_small
from bd_models_small import SmallCNN
from bd_models_small.testing import bright_squares, check_contract, fit, loss_drops, wrap
from bdbench.errors import ParameterError
from bdbench.nn import conv_bn_pairs
from bdbench.plugins import make_plugin_manager

SHAPES = [(1, 28, 28), (3, 32, 32), (2, 8, 12)]


def test_registers_smallcnn() -> None:
    ps = make_plugin_manager(entrypoints=False, extra=[bd_models_small], strict=True)
    assert [c.name for c in ps.list("model")] == ["smallcnn"]
    assert isinstance(ps.create("model", "smallcnn", {"width": "8"}), SmallCNN)


@pytest.mark.parametrize("shape", SHAPES)
def test_contract(shape: tuple[int, int, int]) -> None:
    model = check_contract(SmallCNN.configure({"width": 8}), shape)
    features = model.forward_features(torch.rand(2, *shape))
    assert features.shape[1] == 32 and (features >= 0).all()  # 4 x width channels, post-ReLU


@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bn_pairs_skip_residual_sums(shape: tuple[int, int, int]) -> None:
    """Pairs are the stem conv with the first BN and each block's conv1 with its bn2; BNs fed by a
    residual sum (each block's bn1 after the first, the final BN) are not pairs."""
    model = wrap(SmallCNN.configure({"width": 8, "blocks": 2}).build(10, shape), shape)
    blocks = [f"net.layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1)]
    expected = [("net.conv1", "net.layer1.0.bn1")] + [(f"{b}.conv1", f"{b}.bn2") for b in blocks]
    assert sorted((c, b) for c, _, b, _ in conv_bn_pairs(model, shape)) == sorted(expected)


def test_config() -> None:
    net = SmallCNN.configure({"width": "4", "blocks": "2"}).build(3, (1, 28, 28))
    assert net.num_features == 16 and len(net.layer2) == 2
    assert SmallCNN().config.width == 32
    with pytest.raises(ParameterError, match="width"):
        SmallCNN.configure({"width": 0})


def test_loss_drops() -> None:
    torch.manual_seed(0)
    model = wrap(SmallCNN.configure({"width": 8}).build(10, (1, 28, 28)), (1, 28, 28))
    before, after = loss_drops(model, (1, 28, 28))
    assert after < before


def test_learns_a_separable_task() -> None:
    torch.manual_seed(0)
    x, y = bright_squares(640, (1, 28, 28))
    model = wrap(SmallCNN().build(10, (1, 28, 28)), (1, 28, 28))
    fit(model, x, y, epochs=3)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8
