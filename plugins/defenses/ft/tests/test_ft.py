"""FT on a small trained model (the smoke-preset test is tests/test_end_to_end.py)."""
import torch

from bd_defense_ft import FT
from bdbench.testing import run_component
from bdbench.training import accuracy


def test_fine_tuning_changes_every_layer_and_keeps_accuracy(tiny_model, tiny_dataset, run_context):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items() if v.is_floating_point()}
    result = run_component(FT, {"epochs": "3"}, model=tiny_model, data=tiny_dataset, ctx=run_context)
    after = result.model.state_dict()
    changed = [k for k, v in before.items() if k.endswith("weight") and not torch.equal(v, after[k])]
    assert len(changed) == len([k for k in before if k.endswith("weight")])
    assert accuracy(result.model, tiny_dataset.test, device=run_context.device) > 0.8
