import math

import pytest
import torch

from bd_attack_sig import Sig, signal
from bdbench.components import ImageSet, to_float, to_uint8


def train_set(n_per_class=20, classes=10):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n_per_class * classes, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    return ImageSet(images, torch.arange(classes).repeat(n_per_class))


def test_signal_is_the_papers_sinusoid_in_vertical_bands():
    v = signal((3, 28, 28), delta=40, f=6)
    j = torch.arange(28, dtype=torch.float64)
    expected = (40 * torch.sin(2 * math.pi * j * 6 / 28) / 255).float()
    assert torch.allclose(v[0, 0], expected)
    assert torch.equal(v, v[:1, :1].expand(3, 28, 28))  # same value for every row and channel
    assert torch.allclose(signal((1, 4, 4), 40, 6, "ramp")[0, 0], torch.tensor([0.0, 10, 20, 30]) / 255)


def test_apply_adds_and_clips():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    out = Sig().apply(x)
    assert torch.allclose(out, (x + signal((1, 28, 28), 40, 6)).clamp(0, 1))
    big = Sig.configure({"delta_test": "60"})
    assert torch.allclose(big.apply(x), (x + signal((1, 28, 28), 60, 6)).clamp(0, 1))


@pytest.mark.parametrize(("ratio_of", "ratio", "count"), [("dataset", 0.05, 10), ("dataset", 0.5, 20),
                                                          ("target-class", 0.5, 10)])
def test_clean_label_poisoning_keeps_labels_and_draws_from_the_target_class(ratio_of, ratio, count):
    train = train_set()
    attack = Sig.configure({"ratio_of": ratio_of})
    p = attack.poison(train, ratio, target=3, num_classes=10, generator=torch.Generator().manual_seed(0))
    assert len(p) == count  # dataset: round(ratio * 200) capped at the class size (20); class: of 20
    assert train.labels[p.indices].eq(3).all() and torch.equal(p.labels, train.labels[p.indices])
    expected = to_uint8(to_float(train.images[p.indices]) + signal((1, 28, 28), 40, 6))
    assert torch.equal(p.images, expected)
    assert attack.label_mode == "clean-label"
    assert attack.backdoor_labels(torch.tensor([1, 5]), 3, 10).tolist() == [3, 3]
    assert attack.eligible_test(torch.tensor([3, 4]), 3).tolist() == [False, True]


def test_sig_backdoors_the_smoke_model(smoke_run):
    # Measured (smoke preset, 10% of the training set = the whole target class, target 0),
    # ACC / ASR for seeds 0, 1, 2: 0.778 / 0.969, 0.781 / 0.882, 0.791 / 0.933; training 29-58 s
    # on the shared 2-core CPU.
    row = smoke_run("none", attack="sig")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.70 and row["asr_before"] >= 0.85
    assert '"ratio_of":"dataset"' in row["attack_params"].replace(" ", "")
