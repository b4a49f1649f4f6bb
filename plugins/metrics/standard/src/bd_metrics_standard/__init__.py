"""The standard metric set of the survey and BackdoorBench.

Per stage (before and after the defense), on the core's test sets:

- ACC: accuracy on the clean test set;
- ASR: fraction of backdoor test samples classified as the backdoor label; for all-to-one the
  backdoor test set holds only images whose true label is not the target (BackdoorBench);
- RA: fraction of the same backdoor samples classified as their true label.

Derived (Dunnett et al., "Countering Backdoor Attacks in Image Recognition: A Survey and
Evaluation of Mitigation Strategies", section V-D; BackdoorBench ``utils/metric.py``):

- ARR = (ACC_before - ACC_after) / ACC_before            (accuracy reduction ratio)
- RDR = (ACC_before - RA_after) / ACC_before             (recovery difference ratio)
- DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2
- LCR = RA_after (label correction rate, Karim et al. NFT section 5: the share of poisoned
  samples classified as their original class after the defense)

Fidelity notes: BackdoorBench's prediction-level DER adds the accuracy term; we use the
stated formula (subtracting it), as its ``*_simplied`` versions do. The survey's ARR and RDR
formulas were lost from the seed's text; the definitions above follow its prose (ratios to the
pre-mitigation accuracy, 0 is optimal).
"""
from __future__ import annotations

import torch

from bdbench import Metric, Paper, hookimpl
from bdbench.components import Evaluation


def _rate(hit: torch.Tensor) -> float:
    return float(hit.float().mean().item()) if len(hit) else float("nan")


class Standard(Metric):
    """ACC, ASR and RA per stage; ARR, RDR, DER and LCR from before/after."""

    name = "standard"
    columns = ("acc", "asr", "ra")
    derived = ("arr", "rdr", "der", "lcr")
    paper = Paper(title="Countering Backdoor Attacks in Image Recognition: A Survey and Evaluation of "
                        "Mitigation Strategies", year=2024, arxiv="2411.11200")

    def compute(self, ev: Evaluation) -> dict[str, float]:
        return {
            "acc": _rate(ev.clean_pred == ev.clean_true),
            "asr": _rate(ev.bd_pred == ev.bd_target),
            "ra": _rate(ev.bd_pred == ev.bd_true),
        }

    def derive(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        acc_b, acc_a = before["acc"], after["acc"]
        return {
            "arr": (acc_b - acc_a) / acc_b if acc_b else float("nan"),
            "rdr": (acc_b - after["ra"]) / acc_b if acc_b else float("nan"),
            "der": (max(0.0, before["asr"] - after["asr"]) - max(0.0, acc_b - acc_a) + 1) / 2,
            "lcr": after["ra"],
        }


@hookimpl
def register_metrics(register):
    register(Standard)
