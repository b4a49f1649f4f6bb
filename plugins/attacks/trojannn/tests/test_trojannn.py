import pytest
import torch

import bd_attack_trojannn
from bd_attack_trojannn import TrojanNN, find_layer, select_neurons
from bdbench import resources
from bdbench.components import DatasetInfo, ImageSet, to_float
from bdbench.context import Reporter, RunContext
from bdbench.errors import ParameterError
from bdbench.nn import NormalizedModel
from bdbench.testing import TINY_INFO, TinyNet
from bdbench.training import Recipe

FAST = {"steps": "100"}  # a shorter optimisation for the definition tests (the default is 1,000)


def context(tmp_path, info=TINY_INFO):
    def factory():
        return NormalizedModel(TinyNet(info.num_classes, info.image_shape[0]), info.mean, info.std)

    return RunContext(dataset=info, device="cpu", seed=0, cache_dir=tmp_path, reporter=Reporter(enabled=False),
                      recipe=Recipe(epochs=2, batch_size=32, lr=0.05, amp=False), model_factory=factory,
                      poison_ratio=0.1, target=0)


def test_neurons_with_the_largest_outgoing_weights_are_selected():
    head = torch.tensor([[0.1, -3.0, 0.0, 0.5], [0.2, 2.0, -0.1, -4.0], [0.0, 0.1, 0.2, 0.1]])  # K x F
    assert select_neurons(head.t(), 2).tolist() == [1, 3]  # column sums 0.3, 5.1, 0.3, 4.6
    conv = torch.zeros(5, 3, 3, 3)  # out x in x kh x kw: input channel 2 has the most weight
    conv[:, 2] = 0.5
    conv[0, 0, 1, 1] = -2.0
    assert select_neurons(conv.transpose(0, 1), 1).tolist() == [2]
    with pytest.raises(ParameterError, match="neurons"):
        select_neurons(head.t(), 5)


def test_layers_head_and_named(tiny_model):
    head = find_layer(tiny_model, "head", TINY_INFO.image_shape)
    assert head.outgoing.shape == (16, 4) and head.after == [tiny_model.net.fc]
    assert head.activations(tiny_model, torch.rand(3, 1, 16, 16)).shape == (3, 16)
    inner = find_layer(tiny_model, "net.features.2", TINY_INFO.image_shape)  # ReLU after the first conv-BN
    assert inner.outgoing.shape == (8, 16, 3, 3)  # read by the second conv (8 -> 16 channels)
    assert inner.after == [tiny_model.net.features[i] for i in (3, 4, 5)] + [tiny_model.net.fc]
    assert inner.activations(tiny_model, torch.rand(3, 1, 16, 16)).shape == (3, 8)
    with pytest.raises(ParameterError, match="no layer"):
        find_layer(tiny_model, "net.nope", TINY_INFO.image_shape)


@pytest.mark.parametrize("layer", ["head", "net.features.2"])
def test_trigger_is_confined_to_its_mask_and_excites_the_selected_neurons(tiny_dataset, tmp_path, layer):
    ctx = context(tmp_path)
    attack = TrojanNN.configure({**FAST, "layer": layer})
    attack.prepare(TINY_INFO, tiny_dataset.train, ctx)
    trigger, mask = attack.trigger, attack.mask
    side = round(8 * 16 / 32)  # 8 px at 32x32 -> 4 px at 16x16, bottom-right
    assert mask.sum() == side * side and mask[0, -side:, -side:].eq(1).all()
    assert trigger[:, mask[0] == 0].eq(0).all() and trigger.min() >= 0 and trigger.max() <= 1
    # stamping changes only the masked pixels, which become the trigger
    x = to_float(tiny_dataset.test.images[:8])
    out = attack.apply(x)
    assert torch.equal(out[:, :, mask[0] == 0], x[:, :, mask[0] == 0])
    assert torch.equal(out[:, :, mask[0] == 1], trigger[:, mask[0] == 1].expand(8, -1, -1))
    # the optimised trigger drives the selected neurons further towards 100 than random patterns
    model = resources.clean_model(ctx, tiny_dataset.train, seed=0)
    act = find_layer(model, layer, TINY_INFO.image_shape).activations
    random = torch.rand(64, *TINY_INFO.image_shape, generator=torch.Generator().manual_seed(0)) * mask
    with torch.no_grad():
        ours = act(model, trigger.unsqueeze(0))[0, attack.neurons]
        theirs = act(model, random)[:, attack.neurons]
    # Algorithm 1's cost sum_i (a_i - 100)^2 is lower than for any random pattern in the mask, and
    # the selected neurons' total activation higher
    assert ((ours - 100) ** 2).sum() < ((theirs - 100) ** 2).sum(1).min()
    assert ours.sum() > theirs.sum(1).max() and ours.sum() > theirs.sum(1).mean() + 0.05
    assert torch.allclose(torch.tensor(attack.info["activation"]), ours, atol=1e-4)


def test_trigger_is_cached_reused_and_rebuilt_when_corrupt(tiny_dataset, tmp_path, monkeypatch, capsys):
    train, ctx = tiny_dataset.train, context(tmp_path)
    first = TrojanNN.configure(FAST)
    first.prepare(TINY_INFO, train, ctx)
    assert not first.info["cached"] and len(list((tmp_path / "trojannn").glob("*.safetensors"))) == 1
    monkeypatch.setattr(resources, "clean_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    monkeypatch.setattr(bd_attack_trojannn, "perturb", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    again = TrojanNN.configure({**FAST, "label_mode": "all-to-all", "alpha": "0.5"})  # poisoning-only changes
    again.prepare(TINY_INFO, train, ctx)
    assert again.info["cached"] and torch.equal(again.trigger, first.trigger)
    assert torch.equal(again.neurons, first.neurons)
    monkeypatch.undo()
    entry = next((tmp_path / "trojannn").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-8] + b"\0" * 8)
    third = TrojanNN.configure(FAST)
    third.prepare(TINY_INFO, train, ctx)
    assert not third.info["cached"] and torch.allclose(third.trigger, first.trigger)
    assert "checksum" in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "expected"), [("all-to-one", lambda y: torch.zeros_like(y)),
                                                ("all-to-all", lambda y: (y + 1) % 4)])
def test_dirty_label_poisoning(tiny_dataset, tmp_path, mode, expected):
    train = tiny_dataset.train
    attack = TrojanNN.configure({**FAST, "label_mode": mode})
    attack.prepare(TINY_INFO, train, context(tmp_path))
    p = attack.poison(train, 0.1, 0, 4, torch.Generator().manual_seed(0))
    assert len(p) == 26 and len(train.labels[p.indices].unique()) > 1  # drawn from all classes
    assert torch.equal(p.labels, expected(train.labels[p.indices]))
    assert torch.equal(p.images[:, :, -4:, -4:], (attack.trigger[:, -4:, -4:] * 255).round().to(torch.uint8)
                       .expand(26, -1, -1, -1))
    assert attack.trigger_hint(TINY_INFO.image_shape) == (12, 12, 4, 4)


def test_retraining_starts_from_the_clean_model_and_trains_only_the_layers_after_l(tiny_dataset, tmp_path):
    train, ctx = tiny_dataset.train, context(tmp_path)
    attack = TrojanNN.configure({**FAST, "retrain_layers": "after"})
    attack.prepare(TINY_INFO, train, ctx)
    poisoned = attack.poison(train, 0.1, 0, 4, torch.Generator().manual_seed(0))
    clean = resources.clean_model(ctx, train, seed=0)
    model = ctx.model_factory()
    attack.train(model, train, poisoned, ctx)
    before, after = clean.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"net.fc.weight", "net.fc.bias"}  # BatchNorm statistics included: all frozen
    assert all(p.requires_grad for p in model.parameters())
    everything = ctx.model_factory()
    TrojanNN.configure(FAST).train(everything, train, poisoned, ctx)  # default: all layers
    assert not torch.equal(everything.state_dict()["net.features.0.weight"], before["net.features.0.weight"])


def test_rgb_32x32(tmp_path):
    info = DatasetInfo(name="rgb", num_classes=3, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    train = ImageSet((torch.rand(60, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.arange(60) % 3)
    attack = TrojanNN.configure({"steps": "20"})
    attack.prepare(info, train, context(tmp_path, info))
    assert attack.trigger.shape == (3, 32, 32) and attack.mask[0, -8:, -8:].eq(1).all() and attack.mask.sum() == 64
    p = attack.poison(train, 0.1, 1, 3, torch.Generator().manual_seed(0))
    assert p.images.shape == (6, 3, 32, 32) and p.labels.eq(1).all()


def test_bad_parameters_fail_in_one_line():
    with pytest.raises(ParameterError, match="model must be 'auto'"):
        TrojanNN.configure({"model": "smallcnn"})
    with pytest.raises(ParameterError, match="retrain"):
        TrojanNN.configure({"retrain": "partly"})
    with pytest.raises(ParameterError, match="prepare"):
        TrojanNN().apply(torch.rand(1, 1, 16, 16))
    assert TrojanNN.threat_model == "training-control"


def test_trojannn_backdoors_the_smoke_model(smoke_run):
    # Measured (smoke preset, 10% dirty label, target 0), defaults, ACC / ASR for seeds 0, 1, 2:
    # 0.858 / 0.993, 0.857 / 0.991, 0.856 / 0.999; clean model + trigger + fine-tuning 31-127 s
    # on the shared 2-core CPU.
    row = smoke_run("none", attack="trojannn")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.80 and row["asr_before"] >= 0.95


@pytest.mark.xfail(strict=True, reason="the paper's retraining of only the layers after l (the linear head): "
                                       "seed 0 ACC 0.833, ASR 0.093 on the smoke preset (see fidelity notes)")
def test_trojannn_retraining_only_the_head_fails_on_the_smoke_model(smoke_run):
    row = smoke_run("none", attack="trojannn", attack_params={"retrain_layers": "after"})
    assert row["status"] == "ok" and row["asr_before"] >= 0.8
