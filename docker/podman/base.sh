#!/usr/bin/env bash
# The local base image, for machines that reach Debian's package archive but no
# container registry: Debian bookworm (minbase) with its Python 3.11, made with
# debootstrap and imported into podman. Made once: an image with the same recipe
# already in podman's store is kept (the recipe's hash is its label).
#   bash docker/podman/base.sh            # prints the image's name
# Needs root, debootstrap and podman (ops/setup.sh installs them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
IMAGE=${CASCADE_LOCAL_BASE:-localhost/cascade-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# python3 is 3.11 on bookworm; python3-venv brings ensurepip (the venv's own pip);
# ca-certificates: Debian's public CAs, for HTTPS calls from the running image
PACKAGES=python3,python3-venv,ca-certificates
RECIPE=$( { cat "$0"; echo "$MIRROR $SUITE $PACKAGES"; } | sha256sum | cut -c1-16)

have=$(podman image inspect --format '{{index .Labels "cascade.base.recipe"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$RECIPE" ]; then
  echo "$IMAGE"
  exit 0
fi

root=$(mktemp -d /var/tmp/cascade-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "making $IMAGE with debootstrap ($SUITE minbase + $PACKAGES) ..." >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root/rootfs" "$MIRROR" >"$root/debootstrap.log" 2>&1 \
  || { tail -20 "$root/debootstrap.log" >&2; exit 1; }
# what a base image does not need: package caches, lists, docs, man pages, locales
rm -rf "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/var/lib/apt/lists/* \
       "$root"/rootfs/usr/share/doc/* "$root"/rootfs/usr/share/man/* "$root"/rootfs/usr/share/info/* \
       "$root"/rootfs/var/log/*.log "$root"/rootfs/var/cache/debconf/*-old
find "$root/rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar --numeric-owner -C "$root/rootfs" -c . | podman import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --change "LABEL cascade.base.recipe=$RECIPE" \
  - "$IMAGE" >/dev/null
echo "$IMAGE"
