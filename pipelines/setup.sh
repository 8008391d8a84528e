#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with this package (editable) and its dependencies, torch/torchvision held to
# the exact pair in constraints.txt (pyproject.toml declares only the supported range), and the Debian package
# dataset-fashion-mnist for the demo. Fast when already done (a stamp keyed on pyproject.toml + constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.logitcache-stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating/updating $VENV ($(grep -E '^torch' constraints.txt | tr '\n' ' ')+ deps; a few minutes the first time)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
  echo "$want" > "$VENV/.logitcache-stamp"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ "${LOGITCACHE_SKIP_DATASET:-0}" != 1 ] && [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing the Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "[setup] Fashion-MNIST is missing: install the Debian package 'dataset-fashion-mnist'" \
         "(sudo apt-get install dataset-fashion-mnist) or pass --src DIR with the IDX files" >&2
  fi
fi
