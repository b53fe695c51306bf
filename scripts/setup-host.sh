#!/usr/bin/env bash
# Installs the Debian packages the project needs on a developer machine or in CI: the one place that does.
# Idempotent and quick when everything is already there (dpkg-query only; apt-get runs only for what is missing).
#
#   qemu-system-x86  the DAX lab (TCG with emulated NVDIMMs and SVM)
#   busybox-static   init and shell of the lab and of the Linux guest image
#   cpio             initramfs archives (newc)
#   e2fsprogs        mkfs.ext4 (host tests and, with its libraries, inside the lab)
#   xfsprogs         mkfs.xfs (reflink tests on the host; XFS -o dax=always in the lab)
#   kmod             depmod for the extracted kernel modules
#   gzip             initramfs compression
#   acpica-tools     iasl and acpiexec: the ACPI table round-trip tests
#   python3-fusepy   the FUSE file system with a slow fsync (tests/fixtures/slow_fsync_fs.py: the second-signal test)
#   libfuse2         the library fusepy loads
#   prometheus       a real Prometheus scrapes daxvisor --metrics-addr (tests/fleet.rs)
#   strace           the peer scenario times each VMM's host syncs (images/lab/scenarios/peer.sh)
set -euo pipefail

PACKAGES=(qemu-system-x86 busybox-static cpio e2fsprogs xfsprogs kmod gzip acpica-tools python3-fusepy libfuse2 prometheus strace)

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-host: all packages present (${PACKAGES[*]})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
fi

echo "setup-host: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# An old or absent package list makes the install fail; refresh it once, then install.
if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "setup-host: done"
