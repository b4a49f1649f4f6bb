"""Time the presets: attacked-model training, FT and FP, and their before/after metrics.

    python bench/presets.py --preset smoke --seeds 0 1 2
    python bench/presets.py --preset quick --seeds 0 1 2 --defenses ft fp --attacks badnets blended

Trains every attacked model from a cold, temporary cache; prints a Markdown table (mean and
standard deviation over seeds) for BENCHMARKS.md and writes the rows under --out.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bdbench.context import Reporter
from summarize import fmt  # bench/summarize.py
from bdbench.plugins import make_plugin_manager
from bdbench.runner import Runner, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=["badnets"])
    ap.add_argument("--defenses", nargs="+", default=["ft", "fp"])
    ap.add_argument("--spc", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    plugins = make_plugin_manager(strict=True)
    out = args.out or tempfile.mkdtemp(prefix="bdbench-bench-")
    runner = Runner(plugins, out_dir=out, cache_dir=tempfile.mkdtemp(prefix="bdbench-cache-"),
                    device=args.device, reporter=Reporter(enabled=False))
    rows = []
    for attack in args.attacks:
        for seed in args.seeds:
            for defense in args.defenses:
                start = time.perf_counter()
                rows.append(runner.run(plan(plugins, defense=defense, attack=attack, preset=args.preset,
                                            seed=seed, spc=args.spc)))
                rows[-1]["wall"] = time.perf_counter() - start
    print(f"preset `{args.preset}`, spc {args.spc}, seeds {args.seeds}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| attack | defense | attack train s | defense s | ACC before | ASR before | RA before "
          "| ACC after | ASR after | RA after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        for defense in args.defenses:
            sel = [r for r in rows if r["attack"] == attack and r["defense"] == defense and r["status"] == "ok"]
            if not sel:
                print(f"| {attack} | {defense} | failed: {[r['error'] for r in rows if r['attack'] == attack]} |")
                continue
            trained = [r["attack_seconds"] for r in rows if r["attack"] == attack and not r["attack_cached"]]
            cols = [fmt(trained, 1), fmt([r["defense_seconds"] for r in sel], 1)]
            cols += [fmt([r[f"{m}_{s}"] for r in sel]) for s in ("before", "after") for m in ("acc", "asr", "ra")]
            print(f"| {attack} | {defense} | " + " | ".join(cols) + " |")
    print(f"\nrows: {out}")


if __name__ == "__main__":
    main()
