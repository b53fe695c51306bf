#!/usr/bin/env bash
# Builds the DAX lab image from distribution packages and the project's own static binaries:
#   build/out/vmlinuz        the generic Debian 6.1 kernel (bzImage)
#   build/out/base.cpio.gz   busybox, kernel modules (NVDIMM, DAX, ext4, XFS, KVM, VFIO), mkfs tools, the lab's /init
#   build/out/bins.cpio.gz   the project's static binaries (/usr/bin) and the Linux guest image (/images/linux)
#   build/out/peer.cpio.gz   with --peer: the pinned QEMU with its libraries and firmware (lib/qemu.sh) and strace, added to the
#                            lab only by `run-scenario.sh --peer`
# run-scenario.sh concatenates the two archives with a small per-scenario one. Downloads are cached under build/;
# every archive is repacked only when its content changed, so a second build with nothing changed takes seconds.
#
# Usage: images/lab/build.sh [--no-cargo] [--peer]
#   --no-cargo   leave out the project binaries (the lab itself needs none of them)
#   --peer       also build the peer archive (QEMU for the peer scenario, images/lab/scenarios/peer.sh)
# Environment: CARGO_TARGET_DIR as for cargo; LAB_KERNEL_PACKAGE=NAME[=VERSION] overrides the pinned kernel
# (LAB_KERNEL_PIN in lib/kernel.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "$LAB_DIR/lib/kernel.sh"
source "$LAB_DIR/lib/stage.sh"
source "$LAB_DIR/lib/fio.sh"
source "$LAB_DIR/lib/qemu.sh"

WITH_CARGO=1 WITH_PEER=0
for a in "$@"; do
    case "$a" in
    --no-cargo) WITH_CARGO=0 ;;
    --peer) WITH_PEER=1 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) lab_die "unknown argument $a" ;;
    esac
done

SECONDS=0
mkdir -p "$LAB_BUILD/out"
# One build at a time (tests may start several lab runs at once).
exec 9>"$LAB_BUILD/.lock"
flock 9

"$REPO_ROOT/scripts/setup-host.sh" >&2
lab_fetch_kernel
OUT="$LAB_BUILD/out"
cp -p "$KERNEL_IMAGE" "$OUT/vmlinuz"

# Modules, in insmod order once dependencies are resolved (shared/background/dax-lab.md).
LAB_MODULES=(
    libnvdimm nfit nd_btt nd_pmem device_dax dax_pmem
    crc16 crc32c_generic mbcache jbd2 ext4 libcrc32c xfs
    irqbypass kvm ccp kvm_amd
)
# Loaded only when the lab runs with an IOMMU (run-scenario.sh --iommu): VFIO with the type1 IOMMU backend and
# vfio-pci, which the lab's e1000e is bound to; loop for a page-cache ext4 next to the fs-dax one (the kernel's DMA
# pinning rules differ between the two).
LAB_IOMMU_MODULES=(vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci loop)

lab_log "base: staging ($(lab_elapsed))"
BASE="$LAB_BUILD/stage/base"
rm -rf "$BASE"
mkdir -p "$BASE"
lab_stage_busybox "$BASE"
lab_stage_modules "$BASE" "${LAB_MODULES[@]}"
lab_stage_modules "$BASE" --order modules.iommu.order "${LAB_IOMMU_MODULES[@]}"
lab_stage_dynamic "$BASE" "$(command -v mke2fs)"
ln -sf mke2fs "$BASE$(dirname "$(command -v mke2fs)")/mkfs.ext4"
lab_stage_dynamic "$BASE" "$(command -v mkfs.xfs)"
# e2fsck checks a guest's filesystem in its backing file after the guest unmounted it.
lab_stage_dynamic "$BASE" "$(command -v e2fsck)"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$BASE/etc/"
install -m 0755 "$LAB_DIR/init" "$BASE/init"
echo "root:x:0:0:root:/root:/bin/sh" >"$BASE/etc/passwd"
lab_pack_initramfs "$BASE" "$OUT/base.cpio.gz"

BINS="$LAB_BUILD/stage/bins"
rm -rf "$BINS"
mkdir -p "$BINS/usr/bin" "$BINS/images/linux"
if [ "$WITH_CARGO" = 1 ]; then
    lab_log "bins: cargo build --release (static) ($(lab_elapsed))"
    # +crt-static with an explicit --target: static binaries while proc-macros still build for the host.
    # CARGO is set when this runs under `cargo test`; CARGO_ENCODED_RUSTFLAGS would override RUSTFLAGS.
    exes="$(cd "$REPO_ROOT" && env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="-C target-feature=+crt-static" \
        "${CARGO:-cargo}" build --release \
        --target x86_64-unknown-linux-gnu -p daxvisor -p daxvisor-mapper -p daxvisor-tests -p daxvisor-agent --bins \
        --message-format=json-render-diagnostics |
        grep -o '"executable":"[^"]*"' | sed 's/^"executable":"\(.*\)"$/\1/')" ||
        lab_die "cargo build of the project binaries failed"
    for exe in $exes; do
        lab_is_static "$exe" || lab_die "$exe is dynamically linked"
        strip -o "$BINS/usr/bin/$(basename "$exe")" "$exe"
        lab_log "bins: $(basename "$exe")"
    done
fi

# fio for the guest image (the peer scenario's workload), static from Debian's source.
lab_build_fio

lab_log "linux guest image ($(lab_elapsed))"
AGENT_BIN="$BINS/usr/bin/daxvisor-agent" DMA_READ_BIN="$BINS/usr/bin/dma-read" FIO_BIN="$FIO_BIN" \
    KERNEL_VERSION="$KERNEL_VERSION" KERNEL_ROOT="$KERNEL_ROOT" KERNEL_IMAGE="$KERNEL_IMAGE" "$REPO_ROOT/images/linux/build.sh"
cp -p "$REPO_ROOT/images/linux/build/vmlinuz" "$REPO_ROOT/images/linux/build/initrd.gz" "$BINS/images/linux/"
# The virtual IOMMU scenario's guest (Debian 6.12 from bookworm-backports: 6.1 has no virtio-iommu).
lab_log "linux guest image for the virtual IOMMU ($(lab_elapsed))"
AGENT_BIN="$BINS/usr/bin/daxvisor-agent" DMA_READ_BIN="$BINS/usr/bin/dma-read" GUEST_KERNEL=viommu \
    "$REPO_ROOT/images/linux/build.sh"
mkdir -p "$BINS/images/linux-viommu"
cp -p "$REPO_ROOT/images/linux/build-viommu/vmlinuz" "$REPO_ROOT/images/linux/build-viommu/initrd.gz" \
    "$BINS/images/linux-viommu/"
lab_pack_initramfs "$BINS" "$OUT/bins.cpio.gz"

if [ "$WITH_PEER" = 1 ]; then
    lab_log "peer: staging QEMU ($(lab_elapsed))"
    PEER="$LAB_BUILD/stage/peer"
    rm -rf "$PEER"
    mkdir -p "$PEER"
    lab_stage_qemu "$PEER"
    # The peer scenario times each VMM's host syncs with it.
    lab_stage_dynamic "$PEER" "$(command -v strace || echo /usr/bin/strace)"
    lab_pack_initramfs "$PEER" "$OUT/peer.cpio.gz"
fi

echo "$KERNEL_VERSION" >"$OUT/kernel-version"
lab_log "lab image ready in $OUT ($(lab_elapsed))"
