#!/usr/bin/env bash
# Builds the Linux guest image for guests under daxvisor: the lab's generic Debian 6.1 kernel and a tiny
# initramfs (busybox, virtio_mmio, virtio_pci, virtio_pmem, nd_pmem, virtio_console, ext4, mke2fs, daxvisor-agent when
# AGENT_BIN names a static build of it, fio when FIO_BIN does, and peer-fio) whose /init mounts the
# virtio-pmem device with DAX and runs a command. Output:
#   images/linux/build/vmlinuz     bzImage for `daxvisor run --kernel`
#   images/linux/build/initrd.gz   for `daxvisor run --initrd`
# The kernel download is shared with the lab (images/lab/build/). Repacks only what changed.
#
# GUEST_KERNEL=viommu builds the image of the virtual IOMMU scenario instead, into images/linux/build-viommu/: the
# Debian 6.12 kernel of bookworm-backports (LINUX_VIOMMU_KERNEL_PIN in images/lab/lib/kernel.sh; 6.1 has no
# CONFIG_VIRTIO_IOMMU) and the same initramfs plus virtio-iommu, loaded before nvme so the device it translates
# for is probed behind it. The default image is unchanged.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lab/lib/common.sh"
source "$LAB_DIR/lib/kernel.sh"
source "$LAB_DIR/lib/stage.sh"

LINUX_DIR="$REPO_ROOT/images/linux"
OUT="$LINUX_DIR/build"
EXTRA_MODULES=()
case "${GUEST_KERNEL:-default}" in
default) [ -n "${KERNEL_VERSION:-}" ] || lab_fetch_kernel ;;
viommu)
    OUT="$LINUX_DIR/build-viommu"
    lab_fetch_viommu_kernel
    EXTRA_MODULES=(virtio-iommu)
    ;;
*) lab_die "GUEST_KERNEL=${GUEST_KERNEL}: expected default or viommu" ;;
esac
mkdir -p "$OUT"
cp -p "$KERNEL_IMAGE" "$OUT/vmlinuz"

# virtio_mmio finds the devices daxvisor describes in ACPI (LNRO0005), virtio_pci the virtio-pci functions of
# `--transport pci`; virtio_pmem makes the nd region that nd_pmem turns into /dev/pmem0; virtio_console carries
# the agent channel; ext4 needs crc32c from the crypto API.
GUEST_MODULES=(virtio_mmio virtio_pci "${EXTRA_MODULES[@]}" virtio_pmem nd_pmem virtio_console crc16 crc32c_generic mbcache jbd2 ext4 nvme-core nvme)

ROOT="$LAB_BUILD/stage/linux-guest${GUEST_KERNEL:+-$GUEST_KERNEL}"
rm -rf "$ROOT"
mkdir -p "$ROOT"
lab_stage_busybox "$ROOT"
lab_stage_modules "$ROOT" "${GUEST_MODULES[@]}"
lab_stage_dynamic "$ROOT" "$(command -v mke2fs)"
ln -sf mke2fs "$ROOT$(dirname "$(command -v mke2fs)")/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOT/etc/"
install -m 0755 "$LINUX_DIR/init" "$ROOT/init"
# The agent's default hook: mounts a hot-added pmem, unmounts one about to be removed.
install -D -m 0755 "$LINUX_DIR/agent-hook" "$ROOT/usr/lib/daxvisor-agent/hook"
# The guest agent (a static binary), when the caller built one (the lab build passes AGENT_BIN).
if [ -n "${AGENT_BIN:-}" ] && [ -x "$AGENT_BIN" ]; then
    install -D -m 0755 "$AGENT_BIN" "$ROOT/usr/bin/daxvisor-agent"
fi
# The peer scenario's workload (images/lab/scenarios/peer.sh): a static fio and the script that runs its jobs.
if [ -n "${FIO_BIN:-}" ] && [ -x "$FIO_BIN" ]; then
    install -D -m 0755 "$FIO_BIN" "$ROOT/usr/bin/fio"
fi
install -D -m 0755 "$LINUX_DIR/peer-fio" "$ROOT/usr/bin/peer-fio"
# The passthrough scenario's guest side: O_DIRECT reads from a device into a mapped file.
if [ -n "${DMA_READ_BIN:-}" ] && [ -x "$DMA_READ_BIN" ]; then
    install -D -m 0755 "$DMA_READ_BIN" "$ROOT/usr/bin/dma-read"
fi
# The virtual IOMMU scenario's guest side (images/lab/scenarios/viommu.sh runs it), in that image only.
if [ "${GUEST_KERNEL:-default}" = viommu ]; then
    install -D -m 0755 "$LINUX_DIR/viommu-scenario" "$ROOT/usr/bin/viommu-scenario"
fi
lab_pack_initramfs "$ROOT" "$OUT/initrd.gz"
