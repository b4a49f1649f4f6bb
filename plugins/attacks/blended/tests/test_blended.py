import pytest
import torch

from bd_attack_blended import Blended


def test_blend_formula_with_a_fixed_key():
    attack = Blended()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    key = attack.key_image((1, 28, 28))
    assert torch.allclose(attack.apply(x), 0.8 * x + 0.2 * key)
    assert torch.equal(key, Blended().key_image((1, 28, 28)))  # one key for every run
    assert not torch.equal(key, Blended.configure({"key_seed": 1}).key_image((1, 28, 28)))


@pytest.mark.parametrize("kind", ["noise", "pattern"])
def test_keys_cover_the_pixel_range(kind):
    key = Blended.configure({"key": kind}).key_image((3, 32, 32))
    assert key.shape == (3, 32, 32) and key.min() >= 0 and key.max() <= 1 and key.std() > 0.1


def test_blended_backdoors_the_smoke_model(smoke_run):
    row = smoke_run("none", attack="blended")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.80 and row["asr_before"] >= 0.95
