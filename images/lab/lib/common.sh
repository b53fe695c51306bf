# shellcheck shell=bash
# Shared by images/lab/build.sh, images/linux/build.sh and images/lab/run-scenario.sh: logging and paths.
# Sourced, never run.

LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034 # used by the scripts that source this
REPO_ROOT="$(cd "$LAB_DIR/../.." && pwd)"
# Everything downloaded or generated lives here (gitignored): .deb cache, extracted kernel, staging trees, images.
LAB_BUILD="${LAB_BUILD:-$LAB_DIR/build}"

lab_log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
lab_die() { printf '[lab %s] error: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# Seconds since the script started, for progress lines.
lab_elapsed() { echo "$((SECONDS))s"; }

# A content hash of a directory tree (paths, modes, symlink targets, file contents). Used as a stamp: an archive
# is repacked only when the tree it came from changed.
lab_tree_hash() {
    local dir="$1"
    (
        cd "$dir" || exit 1
        find . -printf '%p %y %m %l\n' | LC_ALL=C sort
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
    ) | sha256sum | cut -d' ' -f1
}

# Pack DIR as a newc cpio archive compressed with gzip into OUT, unless OUT.stamp says DIR has not changed.
lab_pack_initramfs() {
    local dir="$1" out="$2" hash
    hash="$(lab_tree_hash "$dir")"
    if [ -f "$out" ] && [ -f "$out.stamp" ] && [ "$(cat "$out.stamp")" = "$hash" ]; then
        lab_log "$(basename "$out"): unchanged"
        return 0
    fi
    lab_log "$(basename "$out"): packing"
    # Owned by root whoever builds it: the lab's init expects root-owned /dev, /etc.
    (cd "$dir" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 -n) >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "$hash" >"$out.stamp"
    lab_log "$(basename "$out"): $(du -h "$out" | cut -f1)"
}
