import pytest
import torch

from bd_attack_bpp import Bpp, floyd_steinberg, squeeze
from bdbench.components import ImageSet


def images(n=8, h=28, w=28, seed=0):
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", [2, 8, 32])
def test_squeeze_quantizes_to_the_stated_depth(q):
    x = images()
    out = Bpp.configure({"squeeze_num": q}).apply(x)
    levels = out * (q - 1)
    assert torch.allclose(levels, levels.round(), atol=1e-5)  # only q values: k / (q - 1)
    assert len(out.unique()) <= q and (out - x).abs().max() <= 0.5 / (q - 1) + 1e-6


def test_dithering_keeps_the_depth_and_diffuses_the_error():
    x = torch.full((1, 1, 8, 8), 0.3)  # between levels 2/7 and 3/7
    out = Bpp.configure({"dithering": True}).apply(x)
    levels = out * 7
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert len(out.unique()) == 2  # a mix of the two neighbouring levels ...
    assert abs(out.mean().item() - 0.3) < 0.02  # ... whose average keeps the grey value
    assert torch.equal(squeeze(x, 8).unique(), torch.tensor([2 / 7]))  # plain squeezing cannot
    assert torch.equal(floyd_steinberg(x, 8), out)


def test_batch_transform_backdoor_then_negatives_then_clean():
    attack = Bpp()
    train = ImageSet((images(20, seed=1) * 255).to(torch.uint8), torch.arange(20) % 10)
    pool = attack.residuals(train)
    assert torch.allclose(pool, squeeze(train.float(), 8) - train.float())
    x, y = images(64, seed=2), torch.arange(64) % 10
    tx, ty = attack.batch_transform(0.1, 0, 10, pool, torch.Generator().manual_seed(0))(x, y)
    n_bd, n_neg = 6, 6  # int(0.1 * 64), int(0.1 * 64)
    assert torch.allclose(tx[:n_bd], squeeze(x[:n_bd], 8)) and ty[:n_bd].eq(0).all()
    neg = tx[n_bd:n_bd + n_neg] - x[n_bd:n_bd + n_neg]
    assert not torch.allclose(tx[n_bd:n_bd + n_neg], squeeze(x[n_bd:n_bd + n_neg], 8))
    assert neg.abs().max() <= 0.5 / 7 + 1e-6 and neg.abs().sum() > 0  # another image's residual
    assert torch.equal(ty[n_bd:], y[n_bd:])  # negatives keep their true labels
    assert torch.equal(tx[n_bd + n_neg:], x[n_bd + n_neg:])


def test_poisoned_subset_is_squeezed_with_the_target_label():
    attack = Bpp()
    train = ImageSet((images(100, seed=3) * 255).to(torch.uint8), torch.arange(100) % 10)
    p = attack.poison(train, 0.1, target=2, num_classes=10, generator=torch.Generator().manual_seed(0))
    assert len(p) == 10 and p.labels.eq(2).all()
    assert len(p.images.unique()) <= 8
    assert Bpp.threat_model == "training-control"


def test_bpp_backdoors_the_smoke_model(smoke_run):
    # The paper's q = 8 does not reach the floor here (seed 0: ACC 0.847, ASR 0.031; see the
    # fidelity notes); at 1 bit per channel, seeds 0, 1, 2: ACC 0.836 / 0.833 / 0.846,
    # ASR 0.999 / 0.994 / 1.000; training 39-102 s on the shared 2-core CPU.
    row = smoke_run("none", attack="bpp", attack_params={"squeeze_num": "2"})
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.78 and row["asr_before"] >= 0.95
