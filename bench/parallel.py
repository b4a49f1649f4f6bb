"""Run grid files as concurrent shards on one machine (many cores, or one GPU shared by workers).

    python bench/parallel.py --workers 14 --device cuda --cache-dir C --data-dir D --stop-after 480 \\
        bench/grids/defenses-quick.toml:bench-out/defenses bench/grids/study.toml:bench-out/study

Each GRID:OUT pair is a grid file and its results folder, in priority order. First every
attacked model of every grid is trained once (``bdrun grid --models-only``, sharded), so
no two workers train the same model; then worker K runs shard K/N of each grid
in turn (``bdrun grid --shard``). At ``--stop-after`` seconds every worker is interrupted as
Ctrl-C would (finished runs stay, the rest resumes on the next call). Nothing here is needed
for a single machine's grid: ``bdrun grid`` alone does that; this is the same command,
started N times.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", metavar="GRID:OUT")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--stop-after", type=float, default=None, help="seconds; then interrupt every worker")
    ap.add_argument("--log-dir", default=None)
    args = ap.parse_args()
    pairs = [(Path(g), Path(o)) for g, o in (p.split(":", 1) for p in args.pairs)]
    logs = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="bdbench-parallel-"))
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.stop_after if args.stop_after else None
    common = ["--cache-dir", args.cache_dir, "--device", args.device]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def phase(name: str, extra: list[str]) -> bool:
        """Worker K runs shard K/N of each grid in turn; False if the deadline cut it."""
        commands = [[sys.executable, "-m", "bdbench_cli", "grid", str(spec), "--out", str(out), *common, *extra,
                     "--shard"] for spec, out in pairs]
        queues = [[c + [f"{k}/{args.workers}"] for c in commands] for k in range(args.workers)]
        logs_k = [open(logs / f"{name}-{k}.log", "w") for k in range(args.workers)]
        running: dict[int, subprocess.Popen] = {}
        start = time.monotonic()
        while True:
            for k, queue in enumerate(queues):  # start each idle worker's next grid
                if (k not in running or running[k].poll() is not None) and queue:
                    running[k] = subprocess.Popen(queue.pop(0), stdout=logs_k[k], stderr=subprocess.STDOUT, env=env)
            if not any(queues) and all(p.poll() is not None for p in running.values()):
                print(f"{name}: {time.monotonic() - start:.0f} s", flush=True)
                finished = True
                break
            if deadline is not None and time.monotonic() > deadline:
                alive = [p for p in running.values() if p.poll() is None]
                for p in alive:  # a clean stop for every worker at once: finished runs stay, the rest resumes
                    p.send_signal(signal.SIGTERM)
                grace = time.monotonic() + 20
                while any(p.poll() is None for p in alive) and time.monotonic() < grace:
                    time.sleep(0.5)
                for p in alive:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                print(f"{name}: stopped at the deadline after {time.monotonic() - start:.0f} s", flush=True)
                finished = False
                break
            time.sleep(1)
        for log in logs_k:
            log.close()
        return finished

    if phase("models", ["--models-only"]):
        phase("runs", [])


if __name__ == "__main__":
    main()
