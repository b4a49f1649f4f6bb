"""Checks of bdbench's model contract, shared by the tests of the model distributions.

:func:`check_contract` builds a model and checks the timm-style interface and the structure the
core helpers find; :func:`fit`, :func:`bright_squares` (a separable task) and :func:`loss_drops`
check that it trains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdbench import ModelBuilder
from bdbench.nn import NormalizedModel, call_order, classifier, conv_bn_pairs, last_conv


def wrap(net: nn.Module, input_shape: tuple[int, int, int]) -> NormalizedModel:
    channels = input_shape[0]
    return NormalizedModel(net, [0.5] * channels, [0.25] * channels)


def check_contract(builder: ModelBuilder, input_shape: tuple[int, int, int], num_classes: int = 10) -> NormalizedModel:
    """Build, wrap and check the interface; return the wrapped model (in eval mode)."""
    net = builder.build(num_classes, input_shape)
    assert not [m for m in net.modules() if getattr(m, "inplace", False)], "in-place modules hide activations"
    model = wrap(net, input_shape).eval()
    x = torch.rand(3, *input_shape)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert logits.shape == (3, num_classes)
        assert features.dim() == 4 and features.shape[0] == 3
        torch.testing.assert_close(model.forward_head(features), logits)
    head = classifier(model)
    linears = call_order(model, x, (nn.Linear,))
    assert head is net.get_classifier() and head is linears[-1][1], "get_classifier() must be the last Linear"
    assert head.in_features == net.num_features == pooled.shape[1] and head.out_features == num_classes
    pairs = conv_bn_pairs(model, input_shape)
    assert pairs and all(conv.out_channels == bn.num_features for _, conv, _, bn in pairs)
    assert isinstance(last_conv(model, input_shape)[1], nn.Conv2d)
    return model


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 0.05,
        batch_size: int = 64, seed: int = 0) -> None:
    """Plain SGD (momentum 0.9) on the float batch ``x``, shuffled with ``seed``."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def bright_squares(n: int, shape: tuple[int, int, int], num_classes: int = 10,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A separable task: dim noise with a bright square whose position (2 rows x 5 columns of a
    grid, for 10 classes) is the class. Float images in [0, 1] and int64 labels."""
    c, h, w = shape
    y = torch.arange(n) % num_classes
    x = 0.3 * torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    side, cols = max(2, h // 6), (num_classes + 1) // 2
    for i, label in enumerate(y.tolist()):
        r, col = (label // cols) * h // 2 + h // 8, (label % cols) * w // cols
        x[i, :, r:r + side, col:col + side] = 1.0
    return x, y


def loss_drops(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int = 10,
               steps: int = 20) -> tuple[float, float]:
    """Training-mode loss on a fixed :func:`bright_squares` batch before and after ``steps`` SGD
    steps on it.

    Both losses are measured with the same random state, so dropout and stochastic depth draw
    the same masks and the comparison reflects the weights only.
    """
    x, y = bright_squares(32, input_shape, num_classes)

    def loss() -> float:
        model.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return F.cross_entropy(model(x), y).item()

    before = loss()
    fit(model, x, y, epochs=steps, lr=0.01, batch_size=len(x))
    return before, loss()
