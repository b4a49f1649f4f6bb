"""Grid throughput: one defense run, then one small grid in-process and on Ray at 1 and 2 workers.

    python bench/grid.py                      # smoke preset, 4 attacked models x 2 defenses
    python bench/grid.py --seeds 0 1 2 3 4 5 --defenses ft fp nad

Each executor starts from a cold, temporary cache and results folder, so every executor
trains the same attacked models. Reports wall seconds, runs per minute, the throughput
relative to Ray with one worker, the largest per-process peak memory, and the training
images per second (attacked-model training: images x epochs / training seconds).
Ray workers each get one CPU and one torch thread; the in-process executor uses torch's
default thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bdbench import grid as bdgrid
from bdbench.context import Reporter
from bdbench.plugins import make_plugin_manager
from bdbench.presets import get_preset
from bdbench.runner import Runner, plan


def images_per_second(rows: list[dict], preset: str) -> float | None:
    """Attacked-model training throughput over the rows that trained one."""
    p = get_preset(preset)
    recipe = p.recipe
    rates = []
    for r in rows:
        if r["status"] in ("ok", "attack_failed") and not r["attack_cached"] and r["attack_seconds"]:
            train_s = r["attack_seconds"] - (r.get("attack_prepare_seconds") or 0.0)
            n = (r["poison_count"] or 0) / r["poison_ratio"] if r["poison_ratio"] else None
            if n and train_s > 0:
                rates.append(n * json.loads(r["recipe"]).get("epochs", recipe.epochs) / train_s)
    return statistics.mean(rates) if rates else None


def run_executor(name: str, plugins, spec: dict, workers: int | None) -> dict:
    out, cache = tempfile.mkdtemp(prefix="bdbench-grid-"), tempfile.mkdtemp(prefix="bdbench-cache-")
    g = bdgrid.expand(plugins, spec, out)
    kwargs = {"out_dir": out, "cache_dir": cache, "device": "cpu", "reporter": Reporter(enabled=False)}
    start = time.perf_counter()
    if workers is None:
        rows = bdgrid.run_in_process(plugins, g, kwargs)
    else:
        rows = bdgrid.run_ray(g, kwargs, num_cpus=workers, cpus_per_task=1.0)
    wall = time.perf_counter() - start
    return {"executor": name, "runs": len(rows), "ok": sum(r["status"] == "ok" for r in rows), "wall": wall,
            "per_min": 60 * len(rows) / wall, "peak_mb": max(r["peak_memory_mb"] or 0 for r in rows),
            "img_s": images_per_second(rows, spec["presets"][0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    ap.add_argument("--defenses", nargs="+", default=["ft", "fp"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--spc", type=int, default=10)
    ap.add_argument("--skip-single", action="store_true", help="skip the single defense run")
    args = ap.parse_args()
    plugins = make_plugin_manager(strict=True)
    threads = torch.get_num_threads()

    if not args.skip_single:
        runner = Runner(plugins, out_dir=tempfile.mkdtemp(), cache_dir=tempfile.mkdtemp(),
                        reporter=Reporter(enabled=False))
        start = time.perf_counter()
        row = runner.run(plan(plugins, defense=args.defenses[0], attack=args.attacks[0], preset=args.preset,
                              spc=args.spc))
        wall = time.perf_counter() - start
        print(f"one run ({args.defenses[0]} on {args.attacks[0]}, preset {args.preset}, spc {args.spc}, "
              f"{threads} threads): wall {wall:.1f} s, attacked-model training "
              f"{row['attack_seconds'] - row['attack_prepare_seconds']:.1f} s "
              f"({images_per_second([row], args.preset):.0f} images/s), defense {row['defense_seconds']:.1f} s, "
              f"peak memory {row['peak_memory_mb']:.0f} MiB\n")

    spec = {"presets": [args.preset], "attacks": args.attacks, "defenses": args.defenses, "spc": [args.spc],
            "seeds": args.seeds}
    results = [run_executor(f"in-process ({threads} threads)", plugins, spec, None),
               run_executor("ray, 1 worker", plugins, spec, 1),
               run_executor("ray, 2 workers", plugins, spec, 2)]
    base = results[1]["per_min"]
    n_models = len(args.attacks) * len(args.seeds)
    print(f"grid: preset {args.preset}, {n_models} attacked models x {len(args.defenses)} defenses "
          f"({', '.join(args.defenses)}), spc {args.spc}\n")
    print("| executor | runs (ok) | wall s | runs/min | vs ray 1 worker | peak MiB per process | training images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        img = f"{r['img_s']:.0f}" if r["img_s"] else "-"
        print(f"| {r['executor']} | {r['runs']} ({r['ok']}) | {r['wall']:.1f} | {r['per_min']:.2f} | "
              f"{r['per_min'] / base:.2f}x | {r['peak_mb']:.0f} | {img} |")


if __name__ == "__main__":
    main()
