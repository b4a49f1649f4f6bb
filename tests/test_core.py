"""Core contracts and primitives: parameters, splits and budgets, triggers, masks, cache, results."""
from __future__ import annotations

import json
from typing import Literal

import attrs
import pytest
import torch
from torch import nn

from bdbench import data as bddata
from bdbench.cache import TensorCache, load_checkpoint
from bdbench.components import ImageSet, PoisonedSet, to_float
from bdbench.errors import BdbenchError, CacheError, ParameterError, ShapeError
from bdbench.params import canonical_json, make_config, param, positive


@attrs.frozen(kw_only=True)
class Cfg:
    lr: float = param(0.01, source="test", check=positive)
    epochs: int = param(5, source="test", check=positive)
    mode: Literal["a", "b"] = param("a", source="test")
    layers: tuple[int, ...] = param((1, 2), source="test")
    flag: bool = param(False, source="test")
    limit: float | None = param(None, source="test")


def test_params_are_coerced_from_strings_and_validated():
    c = make_config(Cfg, {"lr": "0.5", "epochs": "3", "mode": "b", "layers": "4,5", "flag": "yes", "limit": "none"})
    assert (c.lr, c.epochs, c.mode, c.layers, c.flag, c.limit) == (0.5, 3, "b", (4, 5), True, None)
    assert make_config(Cfg, {"limit": "2"}).limit == 2.0
    for bad, msg in [({"lr": "x"}, "lr must be a number"), ({"epochs": "1.5"}, "epochs must be an integer"),
                     ({"mode": "c"}, "mode must be one of"), ({"lr": "0"}, "lr must be > 0"),
                     ({"flag": "maybe"}, "flag must be true or false"), ({"nope": 1}, "unknown parameter 'nope'")]:
        with pytest.raises(ParameterError, match=msg):
            make_config(Cfg, bad, owner="defense 'x'")


def test_canonical_json_is_stable_and_sorted():
    a = canonical_json(make_config(Cfg, {"lr": "0.5"}))
    b = canonical_json(make_config(Cfg, {"lr": 0.5}))
    assert a == b and list(json.loads(a)) == sorted(json.loads(a))


def test_image_set_rejects_wrong_shapes():
    with pytest.raises(ShapeError, match="uint8 tensor N x C x H x W"):
        ImageSet(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ShapeError, match="labels"):
        ImageSet(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.zeros(2))


def labels(per_class=50, k=10):
    return torch.arange(k).repeat_interleave(per_class)


def test_reserved_split_is_stratified_and_disjoint():
    y = labels(100)
    s = bddata.reserve(y, torch.Generator().manual_seed(0))
    assert len(s.reserved) == 50 and set(s.train.tolist()).isdisjoint(s.reserved.tolist())
    assert torch.bincount(y[s.reserved]).tolist() == [5] * 10


@pytest.mark.parametrize(("spc", "train", "val"), [(2, 1, 1), (10, 9, 1), (100, 90, 10)])
def test_spc_budget_with_validation_follows_the_protocol(spc, train, val):
    y = labels(200)
    tr, va = bddata.draw(y, torch.arange(len(y)), bddata.Budget(spc=spc), with_val=True, train_size=len(y),
                         generator=torch.Generator().manual_seed(1))
    assert torch.bincount(y[tr], minlength=10).tolist() == [train] * 10
    assert torch.bincount(y[va], minlength=10).tolist() == [val] * 10
    assert set(tr.tolist()).isdisjoint(va.tolist())


def test_budget_validation_and_ratio_budget():
    with pytest.raises(ParameterError, match="spc must be a positive integer"):
        bddata.Budget(spc=0)
    with pytest.raises(ParameterError, match="clean_ratio must be in"):
        bddata.Budget(clean_ratio=0.0)
    y = labels(100)
    tr, va = bddata.draw(y, torch.arange(1000), bddata.Budget(clean_ratio=0.05), with_val=True, train_size=1000,
                         generator=torch.Generator().manual_seed(0))
    assert len(tr) + len(va) == 50 and len(va) == 5
    with pytest.raises(ParameterError, match="source has"):
        bddata.draw(y, torch.arange(30), bddata.Budget(spc=10), with_val=False, train_size=1000,
                    generator=torch.Generator())


def test_seen_source_never_hands_out_poisoned_or_reserved_samples():
    y = labels(100)
    full = ImageSet(torch.zeros(1000, 1, 4, 4, dtype=torch.uint8), y)
    split = bddata.reserve(y, torch.Generator().manual_seed(0))
    poisoned = torch.zeros(1000, dtype=torch.bool)
    poisoned[split.train[::3]] = True
    bright, _ = bddata.defender_data(full, split, poisoned, bddata.Budget(spc=2), bddata.get_source("brightness"),
                                     with_val=False, generator=torch.Generator().manual_seed(0))
    assert len(bright) == 20
    tr, _ = bddata.draw(y, split.train[~poisoned[split.train]], bddata.Budget(spc=50), with_val=False,
                        train_size=len(split.train), generator=torch.Generator().manual_seed(0))
    assert not poisoned[tr].any() and set(tr.tolist()).isdisjoint(split.reserved.tolist())


def test_brightness_source_shifts_pixels():
    x = torch.full((2, 1, 2, 2), 100, dtype=torch.uint8)
    assert bddata.brightness(x).unique().tolist() == [150]
    assert bddata.brightness(torch.full((1, 1, 1, 1), 200, dtype=torch.uint8)).item() == 255


def test_poisoned_set_merge_replaces_only_its_indices():
    train = ImageSet(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5))
    p = PoisonedSet(torch.tensor([1, 3]), torch.full((2, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 0]))
    merged = p.merge(train)
    assert merged.labels.tolist() == [0, 0, 2, 0, 4]
    assert merged.images[[1, 3]].eq(255).all() and merged.images[[0, 2, 4]].eq(0).all()
    assert train.images.eq(0).all()  # the original is untouched


def test_cache_detects_corruption(tmp_path):
    cache = TensorCache(tmp_path)
    cache.save("k", {"w": torch.ones(3)}, {"note": 1})
    tensors, meta = cache.load("k")
    assert tensors["w"].tolist() == [1, 1, 1] and meta == {"note": 1}
    data, _ = cache.paths("k")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum"):
        cache.load("k")


def test_checkpoints_never_unpickle_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, path)
    with pytest.raises(CacheError, match="cannot be read safely"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["w"].tolist() == [1, 1]


def test_to_float_is_pixel_scale():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert to_float(x).tolist() == [[[[0.0, 1.0]]]]


class PreActToy(nn.Module):
    """conv -> bn (a pair), then a residual sum feeding a bn (not a pair)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward_features(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h) + h))

    def forward_head(self, f, pre_logits=False):
        f = f.mean((2, 3))
        return f if pre_logits else self.head(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.head


def test_structure_helpers_find_pairs_last_conv_and_feature_module():
    from bdbench.nn import NormalizedModel, conv_bn_pairs, last_conv
    from bdbench.pruning import ChannelMask, channel_activations, feature_module

    model = NormalizedModel(PreActToy(), [0.5], [0.5])
    pairs = conv_bn_pairs(model, (1, 8, 8))
    assert [(c, b) for c, _, b, _ in pairs] == [("net.conv1", "net.bn1")]
    assert last_conv(model, (1, 8, 8))[0] == "net.conv2"
    name, module = feature_module(model, (1, 8, 8))
    assert name == "net.act"
    data = ImageSet(torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8), torch.zeros(6))
    acts = channel_activations(model, module, data, device=torch.device("cpu"))
    assert acts.shape == (4,) and (acts >= 0).all()
    mask = ChannelMask(module, 4)
    mask.prune([1, 2])
    assert channel_activations(model, module, data, device=torch.device("cpu"))[[1, 2]].eq(0).all()
    assert mask.pruned == [1, 2]
    mask.remove()
    assert torch.allclose(channel_activations(model, module, data, device=torch.device("cpu")), acts)


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def test_pgd_stays_in_budget_and_box_and_raises_the_loss():
    import torch.nn.functional as F

    from bdbench.adversarial import pgd

    model = _linear_model()
    x = torch.rand(8, 1, 4, 4)
    y = model(x).argmax(1)
    xa = pgd(model, x, y, eps=0.1, step_size=0.02, steps=10, generator=torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)
    assert all(p.requires_grad for p in model.parameters())


def test_universal_perturbation_is_shared_and_bounded():
    import torch.nn.functional as F

    from bdbench.adversarial import universal

    model = _linear_model()
    data = ImageSet(torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8), torch.zeros(32))
    delta = universal(model, data, lambda m, x, y: F.cross_entropy(m(x), y), eps=0.2, lr=0.05, epochs=5,
                      batch_size=8, device=torch.device("cpu"))
    assert delta.shape == (1, 4, 4) and delta.abs().max() <= 0.2 + 1e-6 and delta.abs().max() > 0.05


def test_minimal_perturbation_crosses_the_boundary_of_a_linear_classifier():
    from bdbench.adversarial import minimal_perturbation

    model = _linear_model()
    x = torch.rand(6, 1, 4, 4) * 0.2 + 0.4
    r, label = minimal_perturbation(model, x, overshoot=0.02)
    flipped = model(x + r).argmax(1)
    assert (label >= 0).all() and torch.equal(flipped, label) and (flipped != model(x).argmax(1)).all()
    # DeepFool on a linear model is exact: a much smaller step does not flip
    assert (model(x + 0.5 * r).argmax(1) == model(x).argmax(1)).all()


def test_mixup_and_distillation_losses():
    from bdbench.losses import attention_distillation, distillation_kl, mixup

    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])
    xm, ya, yb, lam = mixup(x, y, 1.0, torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1 and torch.equal(ya, y) and sorted(yb.tolist()) == [0, 1, 2, 3]
    logits = torch.randn(4, 3)
    assert distillation_kl(logits, logits, 4.0).abs() < 1e-6 and distillation_kl(logits, -logits, 4.0) > 0
    f = torch.rand(2, 3, 4, 4)
    assert attention_distillation(f, f) < 1e-6 and attention_distillation(f, torch.rand(2, 3, 4, 4)) > 0


def test_perturb_starts_where_asked_and_clips_only_when_asked(tiny_model):
    from bdbench.adversarial import perturb

    x = torch.full((2, 1, 16, 16), 0.9)

    def nothing(m, xa):  # a zero gradient: delta stays at its start
        return (m(xa) * 0).sum()

    kw = dict(eps=0.2, step_size=0.05, steps=2)
    assert torch.allclose(perturb(tiny_model, x, nothing, start="max", clip=False, **kw), torch.full_like(x, 0.2))
    assert torch.allclose(perturb(tiny_model, x, nothing, start="max", **kw), torch.full_like(x, 0.1))  # 0.9 + d <= 1
    assert perturb(tiny_model, x, nothing, start="zero", **kw).abs().max() == 0
    rand = perturb(tiny_model, x, nothing, start="random", clip=False, generator=torch.Generator().manual_seed(0), **kw)
    assert rand.abs().max() <= 0.2 and rand.std() > 0.05


def test_perturb_stops_when_asked_before_the_step(tiny_model):
    from bdbench.adversarial import perturb

    x = torch.full((2, 1, 16, 16), 0.5)
    calls = []

    def loss(m, xa):
        calls.append(1)
        return xa.sum() + 0 * m(xa).sum()

    kw = dict(eps=0.2, step_size=0.05, steps=5, start="zero")
    for optimizer in ("sign", "adam"):
        calls.clear()
        assert perturb(tiny_model, x, loss, stop=lambda: len(calls) == 1, optimizer=optimizer, **kw).abs().max() == 0
        calls.clear()
        moved = perturb(tiny_model, x, loss, stop=lambda: len(calls) == 3, optimizer=optimizer, **kw)
        assert len(calls) == 3 and 0 < moved.abs().max() <= 0.2  # two steps taken, then stopped


def test_twice_differentiable_keeps_the_function_and_allows_double_backward():
    from bdbench.nn import twice_differentiable

    model = nn.Sequential(nn.Linear(4, 4), nn.Hardsigmoid(), nn.Linear(4, 1))
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="hardsigmoid"):
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
    with twice_differentiable(model):
        assert not isinstance(model[1], nn.Hardsigmoid)
        torch.testing.assert_close(model(x), nn.Sequential(model[0], nn.Hardsigmoid(), model[2])(x))
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), x)
        assert torch.isfinite(h).all()
    assert isinstance(model[1], nn.Hardsigmoid)  # restored


def test_pruned_batchnorm_channels_output_zero_and_live_in_the_state_dict():
    from bdbench.pruning import prune_batchnorm_channels

    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.bias.fill_(0.5)
    prune_batchnorm_channels(bn, [1, 3])
    out = bn(torch.randn(2, 4, 3, 3))
    assert out[:, [1, 3]].abs().max() == 0 and out[:, [0, 2]].abs().max() > 0
    fresh = nn.BatchNorm2d(4).eval()
    fresh.load_state_dict(bn.state_dict())
    torch.testing.assert_close(fresh(torch.ones(1, 4, 2, 2))[:, [1, 3]], torch.zeros(1, 2, 2, 2))
    with pytest.raises(BdbenchError, match="affine"):
        prune_batchnorm_channels(nn.BatchNorm2d(4, affine=False), [0])


def test_fit_on_some_parameters_computes_no_gradient_for_the_others_and_restores_their_flags(tmp_path):
    """fit(params=masks) trains the masks alone: backward makes no weight gradient, the weights stay
    as they were, and every requires_grad flag comes back (also when the loss raises)."""
    import torch.nn.functional as F

    from bdbench.context import Reporter, RunContext
    from bdbench.masking import NeuronMasks
    from bdbench.testing import TINY_INFO, TinyNet
    from bdbench.training import Recipe, fit

    torch.manual_seed(0)
    model = TinyNet(TINY_INFO.num_classes)
    model.features[0].weight.requires_grad_(False)  # a flag that was already off stays off
    flags = [p.requires_grad for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    masks = NeuronMasks(model)
    ctx = RunContext(dataset=TINY_INFO, cache_dir=tmp_path, reporter=Reporter(enabled=False))
    data = ImageSet(torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8), torch.arange(32) % 4)
    trainable_during = []

    def loss_fn(m, x, y):
        trainable_during.append([p.requires_grad for p in m.parameters()])
        return F.cross_entropy(m(x), y)

    fit(model, data, Recipe(epochs=2, batch_size=8, lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant",
                            amp=False), ctx, loss_fn=loss_fn, params=masks.parameters())
    assert len(trainable_during) == 8 and not any(any(f) for f in trainable_during)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was computed
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert (masks.flat() != 1).any()  # the masks did train
    assert [p.requires_grad for p in model.parameters()] == flags

    def failing(m, x, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(model, data, Recipe(epochs=1, batch_size=8), ctx, loss_fn=failing, params=masks.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
