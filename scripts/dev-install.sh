#!/usr/bin/env bash
# Install bdbench and every plugin distribution editable, in one pip call (siblings resolve locally).
# Usage: scripts/dev-install.sh [extra pip args]
set -euo pipefail
cd "$(dirname "$0")/.."
args=(-e ".[test]")
for p in plugins/*/*/pyproject.toml; do args+=(-e "$(dirname "$p")"); done
python -m pip install "$@" "${args[@]}"
