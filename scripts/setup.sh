#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: Fashion-MNIST from Debian, a virtual environment in .venv
# with torch and every bdbench distribution installed editable. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
need=()
ls /usr/share/datasets/fashion-mnist/*idx3* >/dev/null 2>&1 || need+=(dataset-fashion-mnist)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 setuptools wheel
# setuptools is in the venv: building 40 editable packages without an isolated build env each
# saves minutes
PATH="$PWD/.venv/bin:$PATH" bash scripts/dev-install.sh -q --no-build-isolation
