"""bdbench.masking: BN-neuron masks and perturbations, persistent filter pruning."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bdbench.errors import BdbenchError
from bdbench.masking import FilterPruning, NeuronMasks, exponential_schedule, filter_scores


class Net(nn.Module):
    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for bn in (model.bn1, model.bn2):  # non-trivial affine parameters and statistics
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
    return model.eval()


X = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_masks_scale_gamma_only_and_bake_matches_the_hooked_model():
    model = net()
    masks = NeuronMasks(model, input_shape=(1, 8, 8))
    assert masks.names == ["bn1", "bn2"] and len(masks) == 10
    with torch.no_grad():
        assert torch.allclose(model(X), Net.forward(net(), X), atol=1e-6)  # all-ones masks change nothing
    values = torch.rand(10, generator=torch.Generator().manual_seed(2))
    values[3] = 0.0
    masks.set(values)
    with torch.no_grad():
        hooked = model(X)
    reference = net()
    with torch.no_grad():
        reference.bn1.weight.mul_(values[:4])
        reference.bn2.weight.mul_(values[4:])
        assert torch.allclose(hooked, reference(X), atol=1e-5)
    masks.bake()
    assert model.bn1.weight[3] == 0 and model.bn1.bias[3] != 0  # pruned: gamma = 0, beta kept
    with torch.no_grad():
        assert torch.allclose(model(X), hooked, atol=1e-5)


def test_masks_get_gradients_in_train_mode_and_clamp_per_layer():
    model = net().train()
    masks = NeuronMasks(model)
    model(X).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.parameters())
    with torch.no_grad():
        for m in masks.masks:
            m.fill_(-1.0)
    masks.clamp_([0.3, 0.1], 1.0)
    assert masks.flat()[:4].min().item() == pytest.approx(0.3) and masks.flat()[4:].min().item() == pytest.approx(0.1)


def test_perturbations_are_multiplicative_bounded_and_only_inside_the_context():
    model = net()
    masks = NeuronMasks(model, perturbations=True)
    clean = model(X).detach()
    masks.randomize(0.4, torch.Generator().manual_seed(0))
    assert all(t.abs().max() <= 0.4 for t in masks.noise())
    with masks.perturbed():
        perturbed = model(X)
        grads = torch.autograd.grad(nn.functional.cross_entropy(perturbed, torch.zeros(5, dtype=torch.long)),
                                    masks.noise())
        masks.ascend(grads, 0.4, 0.4)  # a full-size step from a random start stays in [-eps, eps]
    assert all(t.abs().max() <= 0.4 + 1e-7 for t in masks.noise())
    assert not torch.allclose(perturbed, clean)
    assert torch.allclose(model(X), clean)  # outside the context: masks only
    reference = net()
    with torch.no_grad():  # the rule: gamma (m + delta), beta (1 + xi)
        for bn, d, xi in zip((reference.bn1, reference.bn2), masks.delta, masks.xi):
            bn.weight.mul_(1 + d)
            bn.bias.mul_(1 + xi)
        with masks.perturbed():
            assert torch.allclose(model(X), reference(X), atol=1e-5)


def test_models_without_batchnorm_fail_with_one_clear_error():
    with pytest.raises(BdbenchError, match="nft needs BatchNorm2d"):
        NeuronMasks(Net(bn=False), method="nft")


def test_exponential_schedule():
    mu = exponential_schedule(3, 0.8, 0.5)
    assert mu == pytest.approx([0.8 * math.exp(-0.5), 0.8 * math.exp(-1.0), 0.8 * math.exp(-1.5)])


def test_pruned_filters_stay_zero_through_training_and_bake():
    model = net().train()
    pruning = FilterPruning(model)
    pruning.prune("conv1", 2)
    pruning.prune("conv2", 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        model(X).pow(2).sum().backward()
        opt.step()
    assert model.conv1.weight[2].abs().sum() == 0 and model.conv1.bias[2] == 0 and model.conv2.weight[5].abs().sum() == 0
    assert model.conv1.weight[1].abs().sum() > 0
    assert pruning.is_pruned("conv1").tolist() == [False, False, True, False]
    scores = dict(filter_scores(pruning))
    assert scores["conv1"][2] == 0 and scores["conv2"][5] == 0  # a pruned filter cannot be picked again
    pruning.bake()
    assert "conv1.weight" in dict(model.named_parameters()) and model.conv1.weight[2].abs().sum() == 0
