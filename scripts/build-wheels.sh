#!/usr/bin/env bash
# Build one wheel per distribution (the core and every plugin) into one folder.
# Usage: scripts/build-wheels.sh [OUT_DIR]   (default: wheels/)
# Builds with $PYTHON, else the project's .venv, else python3 (it needs setuptools and wheel).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/wheels}" && cd "${1:-$root/wheels}" && pwd)"
dists=("$root")
for p in "$root"/plugins/*/*/pyproject.toml; do dists+=("$(dirname "$p")"); done
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
"$py" -m pip wheel --no-deps --no-build-isolation -q -w "$out" "${dists[@]}"
ls "$out"
