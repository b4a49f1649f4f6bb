"""Resources made by code and cached (bdbench.resources) and the trigger-hint capability."""
from __future__ import annotations

import torch

from bdbench import resources
from bdbench.components import Defense, DefenseResult
from bdbench.context import Reporter, RunContext
from bdbench.nn import NormalizedModel
from bdbench.testing import TINY_INFO, PatchAttack, TinyNet, defense_data
from bdbench.training import Recipe


def context(tmp_path, **kw):
    return RunContext(dataset=TINY_INFO, cache_dir=tmp_path, reporter=Reporter(enabled=False),
                      recipe=Recipe(epochs=1, batch_size=32, lr=0.05, amp=False),
                      model_factory=lambda: NormalizedModel(TinyNet(TINY_INFO.num_classes), TINY_INFO.mean,
                                                            TINY_INFO.std), **kw)


def test_cached_builds_once_and_rebuilds_a_corrupted_entry(tmp_path, capsys):
    ctx, calls = context(tmp_path), []

    def build():
        calls.append(1)
        return {"v": torch.arange(6.0)}, {"note": "made"}

    t, meta = resources.cached(ctx, "thing", {"a": 1}, build)
    assert not meta["cached"] and meta["note"] == "made" and meta["seconds"] >= 0
    t2, meta2 = resources.cached(ctx, "thing", {"a": 1}, build)
    assert meta2["cached"] and torch.equal(t2["v"], t["v"]) and len(calls) == 1
    resources.cached(ctx, "thing", {"a": 2}, build)  # another payload, another entry
    assert len(calls) == 2
    (entry,) = [p for p in (tmp_path / "thing").glob("*.safetensors")
                if resources.key_of({"namespace": "thing", "a": 1}) in p.name]
    entry.write_bytes(entry.read_bytes()[:-4] + b"\0\0\0\0")
    t3, meta3 = resources.cached(ctx, "thing", {"a": 1}, build)
    assert not meta3["cached"] and len(calls) == 3 and torch.equal(t3["v"], t["v"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0] and "rebuilding the thing resource" in err[0]


def test_clean_model_is_trained_once_per_data_and_seed(tiny_dataset, tmp_path):
    ctx = context(tmp_path)
    a = resources.clean_model(ctx, tiny_dataset.train, seed=0)
    b = resources.clean_model(ctx, tiny_dataset.train, seed=0)
    assert not a.training and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                      b.state_dict().values()))
    assert len(list((tmp_path / "clean-models").glob("*.safetensors"))) == 1
    resources.clean_model(ctx, tiny_dataset.train, seed=1)
    assert len(list((tmp_path / "clean-models").glob("*.safetensors"))) == 2


def test_trigger_hint_is_the_patch_box_and_reaches_defenses_that_declare_it(tiny_dataset, run_context):
    from bd_attack_badnets import BadNets
    from bd_attack_blended import Blended

    assert BadNets().trigger_hint((3, 32, 32)) == (29, 29, 3, 3)
    assert BadNets().trigger_hint((1, 28, 28)) == (25, 25, 3, 3)  # round(3 * 28 / 32) = 3
    assert Blended().trigger_hint((3, 32, 32)) is None  # spans the whole image
    # the hint covers exactly the pixels the trigger changes
    x = torch.zeros(1, 1, 16, 16)
    top, left, h, w = PatchAttack().trigger_hint((1, 16, 16))
    changed = (PatchAttack().apply(x) != x)[0, 0]
    assert changed[top:top + h, left:left + w].all() and changed.sum() == h * w

    class Hinted(Defense):
        name = "hinted"
        needs = frozenset({"clean", "target_label", "trigger_hint"})

        def purify(self, model, data, ctx):
            return DefenseResult(model=model)

    data = defense_data(Hinted(), tiny_dataset, run_context)
    assert data.trigger_hint == (14, 14, 2, 2) and data.target == 0
    assert defense_data(Defense(), tiny_dataset, run_context).trigger_hint is None


def test_a_learned_trigger_remakes_the_poisoned_set_with_the_trained_trigger(tiny_dataset):
    from bdbench.components import Attack, LearnedTrigger

    class Learned(LearnedTrigger, Attack):
        name = "learned"
        strength = 0.0

        def apply(self, images, labels=None):
            return (images + self.strength).clamp(0, 1)

    attack = Learned()
    poisoned = attack.poison(tiny_dataset.train, 0.1, 0, 4, torch.Generator().manual_seed(0))
    assert torch.equal(poisoned.images, tiny_dataset.train.images[poisoned.indices])
    attack.strength = 1.0  # "trained"
    attack.refresh_poisoned()
    assert poisoned.images.eq(255).all() and poisoned.labels.eq(0).all()


def test_training_recipe_is_the_runs_with_the_attackers_own_settings():
    import attrs

    from bdbench.components import Attack
    from bdbench.params import param

    class Own(Attack):
        name = "own"

        @attrs.frozen(kw_only=True)
        class Config:
            epochs: int | None = param(None, source="test")
            lr: float | None = param(None, source="test")

    ctx = RunContext(dataset=TINY_INFO, recipe=Recipe(epochs=5, lr=0.05))
    assert Own().training_recipe(ctx) == Recipe(epochs=5, lr=0.05)
    assert Own.configure({"epochs": "2"}).training_recipe(ctx, amp=False) == Recipe(epochs=2, lr=0.05, amp=False)
    assert Own.configure({"lr": "0.001"}).training_recipe(ctx).lr == 0.001
