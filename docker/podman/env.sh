# Source this to run podman by hand with the settings `make image` and the tests use:
#   source docker/podman/env.sh && podman images
# The settings (containers.conf) are those this project's machines need; the store is
# overlay through fuse-overlayfs where /dev/fuse and fuse-overlayfs are there, else vfs
# (CASCADE_PODMAN_STORAGE=vfs|overlay chooses). CASCADE_PODMAN_CONF=0 keeps your own
# podman configuration instead.
if [ "${CASCADE_PODMAN_CONF:-1}" != 0 ]; then
  _cascade_podman_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [ -z "${CASCADE_PODMAN_STORAGE:-}" ]; then
    if [ -c /dev/fuse ] && [ -x /usr/bin/fuse-overlayfs ]; then
      CASCADE_PODMAN_STORAGE=overlay
    else
      CASCADE_PODMAN_STORAGE=vfs
    fi
  fi
  export CASCADE_PODMAN_STORAGE
  export CONTAINERS_CONF="$_cascade_podman_dir/containers.conf"
  export CONTAINERS_STORAGE_CONF="$_cascade_podman_dir/storage-$CASCADE_PODMAN_STORAGE.conf"
  unset _cascade_podman_dir
fi
