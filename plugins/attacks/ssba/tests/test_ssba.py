import json

import pytest
import torch

import bd_attack_ssba
from bd_attack_ssba import SSBA, secret_bits
from bdbench.components import to_float, to_uint8
from bdbench.context import Reporter, RunContext
from bdbench.errors import ParameterError
from bdbench.testing import TINY_INFO

# a short encoder training for the 16 x 16 tiny textures (256 images, 240 steps): 8 bits decode
# sooner than the default 20 (measured: decoded at step 139, PSNR 23.6 dB, bit accuracy 1.0)
TINY = {"epochs": "30", "l2_delay": "20", "l2_ramp": "80", "secret_bits": "8", "lr": "0.002"}
CHEAP = {**TINY, "epochs": "1"}  # an encoder that is only cached, not used


def tiny_context(tmp_path):
    return RunContext(dataset=TINY_INFO, device="cpu", seed=0, cache_dir=tmp_path, reporter=Reporter(enabled=False))


def test_secret_is_the_strings_bits_then_check_bits():
    s = secret_bits("a", 100)
    assert s.shape == (100,) and set(s.unique().tolist()) <= {0.0, 1.0}
    assert s[:8].tolist() == [0, 1, 1, 0, 0, 0, 0, 1]  # "a" = 0x61
    assert s[8:16].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]  # space padding (ISSBA pads to 7 characters)
    assert torch.equal(secret_bits("a", 20), s[:20]) and not torch.equal(secret_bits("b", 100), s)
    with pytest.raises(ParameterError, match="7 UTF-8 bytes"):
        SSBA.configure({"secret": "too long"})
    with pytest.raises(ParameterError):
        SSBA.configure({"secret_bits": "0"})


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12))


def test_sample_specific_invisible_decodable_dirty_label(tiny_dataset, tmp_path):
    ctx = tiny_context(tmp_path)
    attack = SSBA.configure(TINY)
    attack.prepare(TINY_INFO, tiny_dataset.train, ctx)
    assert attack.info["decoded_at"] is not None and not attack.info["cached"]
    train = tiny_dataset.train
    p = attack.poison(train, 0.1, 0, TINY_INFO.num_classes, torch.Generator().manual_seed(0))
    # dirty labels: round(0.1 N) samples from all classes, relabelled to the target
    assert len(p) == round(0.1 * len(train)) and p.labels.eq(0).all()
    assert train.labels[p.indices].ne(0).any()
    x = to_float(train.images[p.indices])
    assert torch.equal(p.images, to_uint8(attack.apply(x)))
    residual = to_float(p.images) - x
    # sample-specific: the residuals of different images differ (mean pairwise correlation well below 1)
    flat = residual.flatten(1) - residual.flatten(1).mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True)
    corr = flat @ flat.T
    off = (corr.sum() - corr.diagonal().sum()) / (len(corr) * (len(corr) - 1))
    assert off < 0.9 and (residual[0] - residual[1]).abs().max() > 0.05, off
    # small: measured on the tiny textures, mean PSNR 23.6 dB, mean L-inf 0.16
    assert psnr(to_float(p.images), x).mean() > 20
    # the decoder recovers the secret from the stored (uint8) poisoned images, not from clean ones
    bits = attack.decode(to_float(p.images))
    assert (bits == attack.secret).float().mean() > 0.95
    assert (attack.decode(x) == attack.secret).float().mean() < 0.85
    # the test-time trigger is the same encoding
    assert torch.allclose(attack.apply(x[:4]), attack.apply(x)[:4], atol=1e-5)
    r = to_float(p.images) - x
    assert r.abs().amax(dim=(1, 2, 3)).mean() < 0.35


def test_encoder_cached_reused_and_rebuilt_when_corrupted(tiny_dataset, tmp_path, monkeypatch, capsys):
    ctx, train = tiny_context(tmp_path), tiny_dataset.train
    x = to_float(train.images[:16])
    attack = SSBA.configure(CHEAP)
    attack.prepare(TINY_INFO, train, ctx)
    assert not attack.info["cached"]
    # cached with a checksum: a second attack loads the encoder without training ...
    entries = list((tmp_path / "ssba").glob("*.json"))
    assert len(entries) == 1 and "history" in json.loads(entries[0].read_text())["meta"]
    monkeypatch.setattr(SSBA, "train_encoder", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    same = SSBA.configure(CHEAP)
    same.prepare(TINY_INFO, train, ctx)
    assert same.info["cached"] and torch.equal(same.apply(x), attack.apply(x))
    # embedding-only parameters (secret, strength) share the encoder
    other = SSBA.configure({**CHEAP, "secret": "b", "strength": "0.5"})
    other.prepare(TINY_INFO, train, ctx)
    assert other.info["cached"] and not torch.equal(other.apply(x), attack.apply(x))
    # ... and a corrupted entry is detected, reported and rebuilt (the training is deterministic)
    monkeypatch.undo()
    data = entries[0].with_suffix(".safetensors")
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    third = SSBA.configure(CHEAP)
    third.prepare(TINY_INFO, train, ctx)
    assert not third.info["cached"] and "checksum" in capsys.readouterr().err
    assert torch.allclose(third.apply(x), attack.apply(x), atol=1e-4)


def test_strength_scales_the_residual_and_apply_needs_prepare(tiny_dataset, tmp_path):
    with pytest.raises(ParameterError, match="prepare"):
        SSBA().apply(torch.rand(2, 1, 16, 16))
    ctx = tiny_context(tmp_path)
    full, none = SSBA.configure(CHEAP), SSBA.configure({**CHEAP, "strength": "0"})
    full.prepare(TINY_INFO, tiny_dataset.train, ctx)
    none.prepare(TINY_INFO, tiny_dataset.train, ctx)
    x = to_float(tiny_dataset.train.images[:8])
    assert none.info["cached"] and torch.equal(none.apply(x), x) and not torch.equal(full.apply(x), x)


def test_ssba_backdoors_the_smoke_model(smoke_run):
    # Measured (smoke preset, 10% dirty-label, target 0, default parameters), per seed 0 / 1 / 2:
    # ACC 0.839 / 0.844 / 0.850; ASR 0.997 / 0.988 / 0.998; encoder build (then cached) 212 / 215 / 76 s
    # on the shared 2-core CPU (the first two under a load average of 10-12).
    row = smoke_run("none", attack="ssba")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.78 and row["asr_before"] >= 0.9
