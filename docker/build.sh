#!/usr/bin/env bash
# `make image`: build the production image (docker/Dockerfile) and print its name, size
# and build time.
#   - With Docker where a Docker daemon answers (a `docker` binary alone is not enough).
#   - Else with podman, as on this project's machines: podman's settings for them
#     (docker/podman/*.conf), a local Debian bookworm base made once with debootstrap
#     (no container registry here), the machine's CA bundle given to pip as a build
#     secret (never copied into the image), pip's downloads kept in a build cache.
# Settings (environment or make variables):
#   LOCAL=1        add llama-cpp-python and the local model pack (compiles llama.cpp: minutes)
#   IMAGE=NAME:TAG default cascade-router:<version in pyproject.toml> (-local with LOCAL=1),
#                  the name ops/k8s/ and docker/compose.yaml use
#   BASE_IMAGE=... default python:3.11-slim with Docker, the local bookworm base with podman
#   ENGINE=docker|podman  skip the detection
#   CA_BUNDLE=FILE the CA bundle pip trusts in the build (default: $PIP_CERT, else the
#                  system's bundle when there is one; CA_BUNDLE= gives none)
#   --print-image  print the image's name and exit
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -1)
LOCAL=${LOCAL:-0}
IMAGE=${IMAGE:-cascade-router:$VERSION$([ "$LOCAL" = 1 ] && echo -local || true)}
if [ "${1:-}" = --print-image ]; then
  echo "$IMAGE"
  exit 0
fi

if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  else
    echo "no container engine: neither a Docker daemon that answers nor podman (bash ops/setup.sh installs podman)" >&2
    exit 1
  fi
fi

if [ -z "${CA_BUNDLE+set}" ]; then
  CA_BUNDLE=${PIP_CERT:-}
  [ -n "$CA_BUNDLE" ] || [ ! -s /etc/ssl/certs/ca-certificates.crt ] || CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
args=(-f docker/Dockerfile --build-arg "LOCAL=$LOCAL" -t "$IMAGE")
[ -z "$CA_BUNDLE" ] || args+=(--secret "id=pip-ca,src=$CA_BUNDLE")

started=$(date +%s)
case "$ENGINE" in
  docker)
    [ -z "${BASE_IMAGE:-}" ] || args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    DOCKER_BUILDKIT=1 docker build "${args[@]}" .
    size=$(docker image inspect --format '{{.Size}}' "$IMAGE")
    ;;
  podman)
    source docker/podman/env.sh
    BASE_IMAGE=${BASE_IMAGE:-$(bash docker/podman/base.sh)}
    # --format docker keeps the HEALTHCHECK (the OCI format has no field for it);
    # host networking: no bridge networks on these machines
    podman build --format docker --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" "${args[@]}" .
    size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    # every rebuild leaves the replaced image and its stages untagged: drop those older
    # than a week (newer ones are the layer cache of the next build)
    podman image prune -f --filter until=168h >/dev/null 2>&1 || true
    ;;
  *)
    echo "ENGINE must be docker or podman, not $ENGINE" >&2
    exit 1
    ;;
esac
echo "built $IMAGE with $ENGINE in $(( $(date +%s) - started )) s: $(( size / 1000000 )) MB"
