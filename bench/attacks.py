"""Per-attack figures: ACC, ASR, RA, training and resource seconds against a clean reference.

    python bench/attacks.py --preset quick --seeds 0 1 2
    python bench/attacks.py --preset quick --attacks badnets wanet --attack-param wanet:s=2
    python bench/attacks.py --out bench-out/attacks --cache-dir bench-out/cache   # resumable
    python bench/attacks.py --out bench-out/attacks --report   # the table of what is there

Every attacked model is trained from a cold cache (a temporary one unless --cache-dir is
given; resources such as LF's clean model and SSBA's encoder are built once per cache and
reused by later seeds, as in a real grid; their build time is the "resource s" column of the
seed that built them). With --out, runs already there are not repeated, so an interrupted
bench resumes. Prints a
Markdown table (mean and standard deviation over seeds) for BENCHMARKS.md; the rows are kept
under --out. ``none`` is the clean model trained with the same recipe.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import attrs
import torch

from bdbench.context import Reporter
from summarize import fmt  # bench/summarize.py
from bdbench.plugins import make_plugin_manager
from bdbench.results import read_results
from bdbench.runner import Runner, plan


def parse_params(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(name, {})[key] = value
    return out


def key(r) -> tuple:
    """The attacked model a row measured, whatever the defense half of its run key."""
    return r["preset"], r["attack"], r["attack_params"], r["poison_ratio"], r["seed"]


def table(rows: dict[tuple[str, str], list[dict]], defaults: dict[str, dict]) -> None:
    """One line per (attack, parameters): mean ± std over the seeds' rows; only parameters that
    differ from ``defaults`` (attack -> its config's defaults) are named."""
    print("| attack | params | status | seeds | ACC | ASR | RA | train s | resource s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (attack, params), rs in rows.items():
        status = "reference" if attack == "none" else ", ".join(sorted({r["status"] for r in rs}))
        rs = [r for r in rs if r["attack_seconds"] is not None]
        p = ", ".join(f"{k}={v}" for k, v in json.loads(params).items() if v != defaults[attack].get(k)) or "defaults"
        if not rs:
            print(f"| {attack} | {p} | {status} | 0 | | | | | |")
            continue
        train = [r["attack_seconds"] - (r["attack_prepare_seconds"] or 0) for r in rs]
        prep = [r["attack_prepare_seconds"] for r in rs]
        asr = "-" if attack == "none" else fmt([r["asr_before"] for r in rs])
        ra = "-" if attack == "none" else fmt([r["ra_before"] for r in rs])
        print(f"| {attack} | {p} | {status} | {len(rs)} | {fmt([r['acc_before'] for r in rs])} | {asr} | {ra} | "
              f"{fmt(train, 1)} | {fmt(prep, 1)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=None, help="default: none and every installed attack")
    ap.add_argument("--attack-param", action="append", default=[], metavar="ATTACK:KEY=VALUE")
    ap.add_argument("--poison-ratio", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--report", action="store_true",
                    help="run nothing: print the table of every attacked model already under --out")
    args = ap.parse_args()
    plugins = make_plugin_manager(strict=True)
    defaults = {i.name: json.loads(json.dumps(attrs.asdict(i.cls.Config()))) for i in plugins.list("attack")}
    attacks = args.attacks or ["none"] + [i.name for i in plugins.list("attack", exclude="none")]
    params = parse_params(args.attack_param)
    out = args.out or tempfile.mkdtemp(prefix="bdbench-bench-")
    done = {key(r): r for r in read_results(out).to_pylist()
            if r["status"] in ("ok", "attack_failed") and not r["attack_cached"] and r["preset"] == args.preset}
    rows: dict[tuple[str, str], list[dict]] = {}
    if args.report:
        for k in sorted(done, key=lambda k: (k[1] != "none", k[1], k[2], k[4])):
            rows.setdefault((k[1], k[2]), []).append(done[k])
    else:
        runner = Runner(plugins, out_dir=out, cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="bdbench-cache-"),
                        device=args.device, reporter=Reporter(enabled=False))
        for attack in attacks:
            for seed in args.seeds:
                exp = plan(plugins, defense="none", attack=attack, preset=args.preset, seed=seed,
                           poison_ratio=args.poison_ratio, attack_params=params.get(attack))
                row = done.get(key(attrs.asdict(exp))) or runner.run(exp, raise_errors=False)
                rows.setdefault((attack, exp.attack_params), []).append(row)
                print(f"{attack} seed {seed}: {row['status']} acc {row['acc_before']} asr {row['asr_before']} "
                      f"{row['attack_seconds'] or 0:.0f} s {row['error'] or ''}", flush=True)
    print(f"\npreset `{args.preset}`, poison ratio {args.poison_ratio}, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    table(rows, defaults)
    print(f"\nrows: {out}")


if __name__ == "__main__":
    main()
