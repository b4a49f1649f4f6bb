"""Check two seed claims on the quick-preset defense table (bench/grids/defenses-quick.toml).

    python bench/claims.py bench-out/defenses

1. Grad-Prune (seed 001, section V-D): with little clean data it beats FP and CLP. Printed: per
   attack and spc, mean ACC and ASR after, and DER, of gradprune, fp and clp over the seeds.
2. NFT (seed 003, Table 5): about 4x faster than ANP, AWM and RNP. Printed: the median defense
   seconds of each per spc, and each one's ratio to NFT's.
"""
from __future__ import annotations

import argparse
import statistics

from bdbench.results import read_results


def mean(values):
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    args = ap.parse_args()
    # the defense grid's rows: the seen source (or none, for data-free defenses), no calibration
    rows = [r for r in read_results(args.results).to_pylist()
            if r["status"] == "ok" and r["source"] in ("seen", None) and r["calibrate"] is None]

    print("Grad-Prune against FP and CLP at low spc (CLP is data-free: one row for every spc)\n")
    print("| attack | spc | defense | runs | ACC after | ASR after | DER |")
    print("|---|---|---|---|---|---|---|")
    for attack in sorted({r["attack"] for r in rows}):
        for spc in (2, 10, 100):
            for defense in ("gradprune", "fp", "clp"):
                sel = [r for r in rows if r["attack"] == attack and r["defense"] == defense
                       and (r["spc"] == spc or (defense == "clp" and r["spc"] is None))]
                if sel:
                    print(f"| {attack} | {spc} | {defense} | {len(sel)} | {mean(r['acc_after'] for r in sel)} "
                          f"| {mean(r['asr_after'] for r in sel)} | {mean(r['der'] for r in sel)} |")

    print("\nRuntime: median defense seconds, and the ratio to NFT's\n")
    print("| spc | defense | runs | median s | / NFT |")
    print("|---|---|---|---|---|")
    for spc in (2, 10, 100):
        med = {}
        for defense in ("nft", "anp", "awm", "rnp"):
            sel = [r["defense_seconds"] for r in rows if r["defense"] == defense and r["spc"] == spc]
            if sel:
                med[defense] = (len(sel), statistics.median(sel))
        for defense, (n, m) in med.items():
            ratio = f"{m / med['nft'][1]:.2f}" if "nft" in med else "-"
            print(f"| {spc} | {defense} | {n} | {m:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
