#!/usr/bin/env bash
# Run grid files on a lent GPU machine in one bounded call, and bring back what finished.
#
#   bench/device-run.sh DATA_DIR SECONDS GRID:OUT [GRID:OUT ...]
#
# Runs from the repository root on a machine that has torch and the third-party packages but
# not bdbench: it installs the wheels built here (scripts/build-wheels.sh -> wheels/) into a
# scratch folder, runs bench/parallel.py with WORKERS (default 15) shards on the GPU until
# SECONDS, compacts every results folder and packs results and the attacked-model cache
# (bench-out/cache) into $OUT, split into parts under 15 MiB. Carry wheels/, the data folder
# and bench-out/ (the earlier call's results and cache, unpacked) so that the call resumes.
# Unpack here with bench/device-unpack.sh FILES_AT.
set -euo pipefail
data="$1"; seconds="$2"; shift 2
site="${TMPDIR:-/tmp}/bdbench-site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" wheels/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench-out/cache
python3 bench/parallel.py --workers "${WORKERS:-15}" --device "${DEVICE:-cuda}" --cache-dir bench-out/cache \
  --data-dir "$data" --stop-after "$seconds" --log-dir bench-out/logs "$@" || echo "parallel.py exited $?"
outs=()
for pair in "$@"; do
  out="${pair#*:}"
  [ -d "$out" ] || continue
  python3 -m bdbench_cli compact "$out" || echo "compact $out failed"
  outs+=("$out")
done
dest="${OUT:-bench-out/packed}"
mkdir -p "$dest"
tar -cf - "${outs[@]}" bench-out/logs | gzip -1 | split -b 15M - "$dest/results.tar.gz.part-"
tar -cf - bench-out/cache | split -b 15M - "$dest/cache.tar.part-"
ls -l "$dest"
