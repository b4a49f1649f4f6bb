import math

import torch

from bd_metrics_standard import Standard
from bdbench.components import Evaluation


def _ev(clean_pred, clean_true, bd_pred, bd_true, target=0):
    t = lambda v: torch.tensor(v)  # noqa: E731
    return Evaluation(clean_pred=t(clean_pred), clean_true=t(clean_true), bd_pred=t(bd_pred), bd_true=t(bd_true),
                      bd_target=torch.full((len(bd_true),), target))


def test_stage_metrics_count_against_the_right_labels():
    m = Standard().compute(_ev([1, 2, 3, 0], [1, 2, 0, 0], [0, 0, 2, 3], [1, 2, 2, 1]))
    assert m["acc"] == 0.75
    assert m["asr"] == 0.5  # two of four backdoor samples go to target 0
    assert m["ra"] == 0.25  # one is classified as its true label


def test_derived_metrics_follow_the_survey_and_der_subtracts_the_accuracy_drop():
    before = {"acc": 0.9, "asr": 1.0, "ra": 0.0}
    after = {"acc": 0.8, "asr": 0.1, "ra": 0.6}
    d = Standard().derive(before, after)
    assert math.isclose(d["arr"], 0.1 / 0.9)
    assert math.isclose(d["rdr"], 0.3 / 0.9)
    assert math.isclose(d["der"], (0.9 - 0.1 + 1) / 2)
    assert d["lcr"] == 0.6
    # an accuracy gain is not rewarded by DER, a drop is penalised
    assert Standard().derive(before, {"acc": 0.95, "asr": 1.0, "ra": 0})["der"] == 0.5
