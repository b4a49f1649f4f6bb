#!/usr/bin/env bash
# Unpack what bench/device-run.sh packed (results folders, logs, attacked-model cache) into the
# repository root, replacing the earlier copies of the same folders.
#   bench/device-unpack.sh FOLDER
set -euo pipefail
src="$1"
cd "$(dirname "$0")/.."
if compgen -G "$src/results.tar.gz.part-*" >/dev/null; then cat "$src"/results.tar.gz.part-* | tar -xzf -; fi
if compgen -G "$src/cache.tar.part-*" >/dev/null; then cat "$src"/cache.tar.part-* | tar -xf -; fi
ls bench-out
