import pytest
import torch

from bd_attack_badnets import BadNets
from bdbench.components import ImageSet


def images(n=8, c=1, h=28, w=28):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, h, w, generator=g) * 0.5


@pytest.mark.parametrize(("shape", "side"), [((1, 28, 28), 3), ((3, 32, 32), 3), ((3, 64, 64), 6)])
def test_only_the_corner_patch_changes_and_it_is_white(shape, side):
    x = images(4, *shape)
    out = BadNets().apply(x)
    changed = (out != x).any(dim=(0, 1))
    expected = torch.zeros(shape[1:], dtype=torch.bool)
    expected[-side:, -side:] = True
    assert torch.equal(changed, expected)
    assert out[:, :, -side:, -side:].eq(1.0).all()


def test_dirty_label_poisoning_counts_and_labels():
    train = ImageSet((images(200) * 255).to(torch.uint8), torch.arange(10).repeat(20))
    attack = BadNets()
    p = attack.poison(train, 0.1, target=3, num_classes=10, generator=torch.Generator().manual_seed(0))
    assert len(p) == 20 and p.labels.eq(3).all()
    assert p.images[:, :, -3:, -3:].eq(255).all()
    assert torch.equal(p.images[:, :, :-3, :], train.images[p.indices][:, :, :-3, :])


def test_all_to_all_shifts_labels_and_keeps_every_test_image():
    attack = BadNets.configure({"label_mode": "all-to-all"})
    y = torch.tensor([0, 1, 9])
    assert attack.backdoor_labels(y, target=0, num_classes=10).tolist() == [1, 2, 0]
    assert attack.eligible_test(y, target=0).all()
    assert BadNets().eligible_test(y, target=0).tolist() == [False, True, True]
