"""Fine-Pruning's selection rule on a small trained model (the smoke-preset test is tests/test_end_to_end.py)."""
import json

import torch

from bd_defense_fp import FP
from bdbench.testing import run_component
from bdbench.training import accuracy


def test_pruning_stops_within_the_validation_threshold_and_masks_stay_zero(tiny_model, tiny_dataset, run_context):
    result = run_component(FP, {"epochs": "2", "acc_ratio": "0.2", "prune_step": "0.05"},
                           model=tiny_model, data=tiny_dataset, ctx=run_context)
    d = result.diagnostics
    assert 0 < d["pruned"] < d["channels"]
    assert d["val_acc_pruned"] > (1 - 0.2) * d["val_acc_initial"]  # the kept model satisfies the rule
    json.dumps(d)  # diagnostics are JSON-able
    # the pruned channels read zero after fine-tuning
    from bdbench.pruning import feature_module

    _, layer = feature_module(result.model, tiny_dataset.info.image_shape)
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        result.model(tiny_dataset.test.float()[:8])
    handle.remove()
    channel_energy = seen[-1].abs().sum(dim=(0, 2, 3))
    assert (channel_energy == 0).sum() >= d["pruned"]
    assert accuracy(result.model, tiny_dataset.test, device=run_context.device) > 0.8
