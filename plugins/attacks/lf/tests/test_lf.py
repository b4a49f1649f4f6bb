import json

import torch

from bd_attack_lf import LF, gaussian_kernel, low_pass
from bdbench import resources
from bdbench.components import to_float, to_uint8
from bdbench.context import Reporter, RunContext
from bdbench.nn import NormalizedModel
from bdbench.testing import TINY_INFO, TinyNet
from bdbench.training import Recipe


def low_frequency_share(v: torch.Tensor, cutoff: float) -> float:
    """Share of the (mean-removed) energy at spatial frequencies up to ``cutoff`` cycles per image."""
    spec = torch.fft.fft2(v - v.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    h, w = v.shape[-2:]
    fy, fx = torch.fft.fftfreq(h) * h, torch.fft.fftfreq(w) * w
    radius = (fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2).sqrt()
    return (spec[..., radius <= cutoff].sum() / spec.sum().clamp_min(1e-20)).item()


def test_low_pass_kernel_and_filter():
    k = gaussian_kernel(5.25)  # sigma 6 px at 32, scaled to 28
    assert len(k) % 2 == 1 and abs(k.sum().item() - 1) < 1e-6 and k.argmax() == len(k) // 2
    noise = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert low_frequency_share(noise, 3) < 0.1
    assert low_frequency_share(low_pass(noise, 5.25), 3) > 0.95


def tiny_context(tmp_path):
    return RunContext(dataset=TINY_INFO, device="cpu", seed=0, cache_dir=tmp_path, reporter=Reporter(enabled=False),
                      recipe=Recipe(epochs=2, batch_size=32, lr=0.05, amp=False), model_factory=tiny_factory)


def tiny_factory():
    return NormalizedModel(TinyNet(TINY_INFO.num_classes, TINY_INFO.image_shape[0]), TINY_INFO.mean, TINY_INFO.std)


def test_perturbation_is_low_frequency_bounded_cached_and_checked(tiny_dataset, tmp_path, monkeypatch, capsys):
    ctx = tiny_context(tmp_path)
    attack = LF.configure({"max_passes": "2", "steps": "5"})
    attack.prepare(TINY_INFO, tiny_dataset.train, ctx)
    p = attack.poison(tiny_dataset.train, 0.1, 0, TINY_INFO.num_classes, torch.Generator().manual_seed(0))
    v = attack.perturbation
    # bounded: the reference's min-max scaling to [0, 0.2]
    assert v.shape == TINY_INFO.image_shape and v.min() >= 0 and v.max() <= 0.2 + 1e-6
    assert v.max() - v.min() > 0.19
    # low-frequency: almost all its energy within 2 cycles per image (16 x 16 images, sigma 3 px)
    assert low_frequency_share(v, 2) > 0.9
    # dirty-label poisoning with x' = clip(x + v)
    assert len(p) == round(0.1 * len(tiny_dataset.train)) and p.labels.eq(0).all()
    assert torch.equal(p.images, to_uint8(to_float(tiny_dataset.train.images[p.indices]) + v))
    # cached with a checksum: a second attack loads it without training ...
    entries = list((tmp_path / "lf").glob("*.json"))
    assert len(list((tmp_path / "clean-models").glob("*.safetensors"))) == 1
    assert len(entries) == 1 and "fooling_rate" in json.loads(entries[0].read_text())["meta"]
    again = LF.configure({"max_passes": "2", "steps": "5"})
    monkeypatch.setattr(resources, "clean_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again.prepare(TINY_INFO, tiny_dataset.train, ctx)
    assert torch.equal(again.make(0), v)
    # ... and a corrupted entry is detected, reported and rebuilt
    monkeypatch.undo()
    data = entries[0].with_suffix(".safetensors")
    data.write_bytes(data.read_bytes()[:-8] + b"\0" * 8)
    third = LF.configure({"max_passes": "2", "steps": "5"})
    third.prepare(TINY_INFO, tiny_dataset.train, ctx)
    assert torch.allclose(third.make(0), v, atol=1e-5)
    assert "checksum" in capsys.readouterr().err


def test_lf_backdoors_the_smoke_model(smoke_run):
    # Measured (smoke preset, 10% dirty-label, target 0), ACC / ASR for seeds 0, 1, 2:
    # 0.847 / 0.848 / 0.855, ASR 0.999 / 0.994 / 0.999; attacked-model training 64-85 s plus
    # 100-160 s for the clean model and the perturbation (cached) on the shared 2-core CPU.
    row = smoke_run("none", attack="lf")
    assert row["status"] == "ok"
    assert row["acc_before"] >= 0.75 and row["asr_before"] >= 0.95
