#!/bin/sh
# Creates and mounts an XFS filesystem with reflink=1 on a loop device at a stable path, so the mapper tests can
# exercise shared (reflinked) extents, unwritten extents and holes on XFS. Idempotent: a second run only checks.
# Tests look for the mount at $DAXVISOR_XFS_DIR (default /mnt/daxvisor-xfs) and skip with a message if absent.
#
# Usage: scripts/xfs-loop.sh [mount-dir]        (env: DAXVISOR_XFS_IMG image path, DAXVISOR_XFS_SIZE e.g. 2G)
#        scripts/xfs-loop.sh --umount [mount-dir]
set -eu

umount_only=0
if [ "${1:-}" = "--umount" ]; then umount_only=1; shift; fi
MNT="${1:-${DAXVISOR_XFS_DIR:-/mnt/daxvisor-xfs}}"
IMG="${DAXVISOR_XFS_IMG:-/var/tmp/daxvisor-xfs.img}"
SIZE="${DAXVISOR_XFS_SIZE:-2G}"

is_xfs_mount() {
    [ "$(findmnt -n -o FSTYPE --target "$1" 2>/dev/null | head -n1)" = "xfs" ] &&
        [ "$(findmnt -n -o TARGET --target "$1" 2>/dev/null | head -n1)" = "$1" ]
}

if [ "$umount_only" = 1 ]; then
    if is_xfs_mount "$MNT"; then umount "$MNT"; echo "xfs-loop: unmounted $MNT"; fi
    exit 0
fi

if is_xfs_mount "$MNT"; then
    echo "xfs-loop: $MNT already mounted (xfs)"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "xfs-loop: needs root to mount a loop device; XFS tests will be skipped" >&2
    exit 1
fi

if ! command -v mkfs.xfs >/dev/null 2>&1; then
    echo "xfs-loop: installing xfsprogs"
    DEBIAN_FRONTEND=noninteractive apt-get install -y xfsprogs >/dev/null
fi

mkdir -p "$MNT" "$(dirname "$IMG")"
if [ ! -f "$IMG" ]; then
    truncate -s "$SIZE" "$IMG"
    mkfs.xfs -q -m reflink=1 "$IMG"
    echo "xfs-loop: created $IMG ($SIZE, reflink=1)"
fi

# mount -o loop picks a free loop device and releases it on umount.
if ! mount -o loop -t xfs "$IMG" "$MNT"; then
    echo "xfs-loop: mounting $IMG on $MNT failed (loop devices or mount not permitted here); XFS tests will be skipped" >&2
    exit 1
fi
chmod 1777 "$MNT"
if ! xfs_info "$MNT" | grep -q 'reflink=1'; then
    echo "xfs-loop: $MNT is not reflink=1" >&2
    exit 1
fi
echo "xfs-loop: mounted $IMG on $MNT (xfs, reflink=1)"
