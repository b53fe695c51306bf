#!/usr/bin/env bash
# Runs one scenario in the DAX lab and returns its exit status.
#
# Usage: images/lab/run-scenario.sh SCENARIO.sh [--xfs] [--iommu] [--peer] [--timeout SECS] [--file PATH]... [--no-build] [--keep]
#        images/lab/run-scenario.sh --shell [--xfs] [--iommu] [--file PATH]...
#   --xfs          the fs-dax mount is XFS with -o dax=always (default: ext4 with -o dax)
#   --iommu        q35 with an intel-iommu, an e1000e and an NVMe bound to vfio-pci (LAB_VFIO_GROUP=/dev/vfio/N,
#                  LAB_NVME_DEVICE)
#   --peer         add the peer archive (build.sh --peer): the pinned QEMU 7.2 for images/lab/scenarios/peer.sh
#   --timeout S    hard limit for the whole QEMU run (default 600; none with --shell); QEMU is killed past it
#   --file PATH    copy PATH into the lab as /lab/files/NAME (repeatable)
#   --no-build     use the lab image as built (default: run build.sh first, seconds when nothing changed)
#   --keep         keep the NVDIMM backing files (printed) instead of deleting them
#   --shell        no scenario: an interactive shell on the lab console once it is set up (Ctrl-A X quits QEMU)
#
# QEMU (TCG, -cpu max: SVM, two vCPUs: with one, the lab froze now and then while a nested Linux guest booted, see
# README.md) boots the lab kernel with two emulated NVDIMMs backed by fresh files; the lab's /init
# makes one fs-dax (mounted at /mnt/dax) and the other device-DAX, loads kvm-amd, then runs SCENARIO.sh with:
#   LAB_DAX_MNT=/mnt/dax  LAB_FS=ext4|xfs  LAB_PMEM_DEV=/dev/pmemN  LAB_DEVDAX=/dev/daxN.M  LAB_DEVDAX_SIZE=bytes
#   LAB_LINUX_KERNEL, LAB_LINUX_INITRD (the Linux guest image)  and the project binaries in PATH (/usr/bin);
#   with --iommu also LAB_VFIO_GROUP=/dev/vfio/N and LAB_VFIO_DEVICE=/sys/bus/pci/devices/BDF (the e1000e).
# The scenario's output is printed between BEGIN/END lines; the lab console goes to a log whose path is printed.
# Exit status: the scenario's; 124 when the timeout hit or the lab's kernel failed (soft lockup, panic, oops: it
# is stopped then); 125 when the lab failed before or around the scenario.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

SCENARIO='' FS=ext4 IOMMU=0 PEER=0 TIMEOUT='' BUILD=1 KEEP=0 SHELL_MODE=0
FILES=()
while [ $# -gt 0 ]; do
    case "$1" in
    --xfs) FS=xfs ;;
    --iommu) IOMMU=1 ;;
    --peer) PEER=1 ;;
    --timeout) [ $# -ge 2 ] || lab_die "--timeout needs seconds"; TIMEOUT="$2"; shift ;;
    --file) [ $# -ge 2 ] && [ -f "$2" ] || lab_die "--file needs an existing file"; FILES+=("$2"); shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --shell) SHELL_MODE=1 ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) lab_die "unknown option $1" ;;
    *) [ -z "$SCENARIO" ] || lab_die "one scenario at a time"; SCENARIO="$1" ;;
    esac
    shift
done
case "$TIMEOUT" in
"") TIMEOUT=600 ;;
*[!0-9]* | 0) lab_die "--timeout takes a positive number of seconds, not '$TIMEOUT'" ;;
esac
if [ "$SHELL_MODE" = 1 ]; then
    [ -z "$SCENARIO" ] || lab_die "--shell takes no scenario"
    NAME=shell
else
    [ -n "$SCENARIO" ] && [ -f "$SCENARIO" ] ||
        lab_die "usage: run-scenario.sh SCENARIO.sh [--xfs] [--iommu] [--timeout SECS] [--file PATH]... (or --shell)"
    NAME="$(basename "$SCENARIO" .sh)"
fi

if [ "$BUILD" = 1 ]; then
    if [ "$PEER" = 1 ]; then "$LAB_DIR/build.sh" --peer; else "$LAB_DIR/build.sh"; fi
fi
OUT="$LAB_BUILD/out"
ARCHIVES=(base.cpio.gz bins.cpio.gz)
[ "$PEER" = 1 ] && ARCHIVES+=(peer.cpio.gz)
for f in vmlinuz "${ARCHIVES[@]}"; do
    [ -f "$OUT/$f" ] || lab_die "$OUT/$f missing: run images/lab/build.sh$([ "$PEER" = 1 ] && echo " --peer")"
done
command -v qemu-system-x86_64 >/dev/null || lab_die "qemu-system-x86_64 missing: run scripts/setup-host.sh"

# Logs stay after the run (under build/logs); the NVDIMM files live in a fresh temporary directory.
LOGS="$LAB_BUILD/logs/$NAME.$(date +%Y%m%d-%H%M%S).$$"
mkdir -p "$LOGS"
find "$LAB_BUILD/logs" -mindepth 1 -maxdepth 1 -type d -mtime +7 -exec rm -rf {} + 2>/dev/null || true
WORK="$(mktemp -d "${TMPDIR:-/tmp}/daxlab.XXXXXX")"
cleanup() {
    if [ "$KEEP" = 1 ]; then lab_log "NVDIMM files kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The scenario travels as a third initramfs archive appended to the lab's two (the kernel unpacks them in order).
mkdir -p "$WORK/scenario/lab/files"
if [ -n "$SCENARIO" ]; then
    install -m 0755 "$SCENARIO" "$WORK/scenario/lab/scenario.sh"
fi
for f in "${FILES[@]}"; do
    cp -L "$f" "$WORK/scenario/lab/files/"
done
(cd "$WORK/scenario" && find . | cpio --quiet -o -H newc -R 0:0 | gzip -1 -n) >"$WORK/scenario.cpio.gz"
for f in "${ARCHIVES[@]}"; do cat "$OUT/$f"; done | cat - "$WORK/scenario.cpio.gz" >"$WORK/initrd.gz"

FSDAX_SIZE=$((512 << 20))
DEVDAX_SIZE=$((256 << 20))
CONSOLE="$LOGS/console.log"
SCEN_OUT="$LOGS/scenario.out"
: >"$CONSOLE"
: >"$SCEN_OUT"

# With --iommu: q35 (intel-iommu is a q35 device; interrupt remapping needs the split irqchip) and an e1000e for
# vfio-pci, on a user-mode netdev that goes nowhere.
# shellcheck disable=SC2054 # commas belong to QEMU's option syntax
if [ "$IOMMU" = 1 ]; then
    # An emulated NVMe for passthrough to a guest under daxvisor (LAB_NVME_DEVICE): 8 MiB whose every 16-byte
    # line names its own byte offset ("dv" and 13 digits), so a DMA read lands recognisably.
    awk 'BEGIN { for (i = 0; i < 524288; i++) printf "dv%013d\n", i * 16 }' >"$WORK/nvme.img"
    MACHINE=(-M q35,nvdimm=on,kernel-irqchip=split -device intel-iommu,intremap=on
        -netdev user,id=n0,restrict=on -device e1000e,netdev=n0
        -drive file="$WORK/nvme.img",if=none,id=nvm,format=raw -device nvme,serial=dvnvme,drive=nvm)
else
    MACHINE=(-M pc,nvdimm=on)
fi
# shellcheck disable=SC2054
QEMU_ARGS=(
    -nodefaults -display none -no-reboot
    "${MACHINE[@]}" -cpu max -smp 2 -m 2G,slots=4,maxmem=8G
    -object memory-backend-file,id=mem1,share=on,"mem-path=$WORK/nvdimm-fsdax,size=$FSDAX_SIZE"
    -device nvdimm,id=nv1,memdev=mem1
    -object memory-backend-file,id=mem2,share=on,"mem-path=$WORK/nvdimm-devdax,size=$DEVDAX_SIZE"
    -device nvdimm,id=nv2,memdev=mem2
    -kernel "$OUT/vmlinuz" -initrd "$WORK/initrd.gz"
)
# Not quiet: the lab kernel's boot messages go to the console log, so a lab that stops while booting shows where
# (one CI run saw a lab stop before its /init said anything).
APPEND="console=ttyS0 panic=-1 lab.fs=$FS lab.fsdax_size=$FSDAX_SIZE lab.devdax_size=$DEVDAX_SIZE"
# no_timer_check: with interrupt remapping the kernel panics ("timer doesn't work through Interrupt-remapped
# IO-APIC") when its boot-time timer check runs late, which TCG on a busy host makes it do now and then.
[ "$IOMMU" = 1 ] && APPEND="$APPEND intel_iommu=on no_timer_check lab.iommu=1"

if [ "$SHELL_MODE" = 1 ]; then
    lab_log "lab shell: booting ($FS); Ctrl-A X quits QEMU"
    qemu-system-x86_64 "${QEMU_ARGS[@]}" -append "$APPEND lab.shell=1" \
        -serial mon:stdio -serial file:"$SCEN_OUT"
    exit $?
fi

lab_log "scenario $NAME: booting the lab ($FS$([ "$IOMMU" = 1 ] && echo ", IOMMU"), timeout ${TIMEOUT}s); console: $CONSOLE"
start=$SECONDS
set +e
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" -append "$APPEND" \
    -serial file:"$CONSOLE" -serial file:"$SCEN_OUT" </dev/null >"$LOGS/qemu.log" 2>&1 &
qemu_pid=$!
# The lab's own kernel can fail under the emulated SVM (a soft lockup in KVM, a panic, an oops) and then never
# finishes the scenario: stop it when its console says so instead of waiting out the timeout. Only the lab
# kernel's lines count ("[  12.3] ..."), not a nested guest's that a session copies there ("guest| ...").
LAB_DEAD='^\[ *[0-9]+\.[0-9]+\] (watchdog: BUG: soft lockup|Kernel panic - not syncing|BUG: )'
dead=''
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ -z "$dead" ] && dead="$(grep -a -m1 -E "$LAB_DEAD" "$CONSOLE" 2>/dev/null)"; then
        sleep 5 # the rest of the report
        kill "$qemu_pid" 2>/dev/null
    fi
    sleep 1
done
wait "$qemu_pid"
qemu_rc=$?
set -e
took=$((SECONDS - start))

# The scenario channel is a serial line: strip the carriage returns the tty adds.
tr -d '\r' <"$SCEN_OUT" >"$SCEN_OUT.txt"
status_line="$(grep -a '^LAB-SCENARIO-STATUS: ' "$SCEN_OUT.txt" | tail -n1 || true)"

echo "===== BEGIN scenario $NAME ====="
grep -a -v '^LAB-SCENARIO-STATUS: ' "$SCEN_OUT.txt" || true
if [ -n "$dead" ]; then
    status=124
    echo "===== END scenario $NAME: THE LAB'S KERNEL FAILED after ${took}s (QEMU stopped): ${dead#*] } ====="
    echo "lab: last console lines:"
    tail -n 30 "$CONSOLE" | tr -d '\r' | sed 's/^/  | /'
elif [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    status=124
    echo "===== END scenario $NAME: TIMEOUT after ${took}s (QEMU killed) ====="
    echo "lab: last console lines (where it stopped):"
    tail -n 30 "$CONSOLE" | tr -d '\r' | sed 's/^/  | /'
elif [ -z "$status_line" ]; then
    status=125
    echo "===== END scenario $NAME: NO STATUS (QEMU exited $qemu_rc after ${took}s) ====="
    echo "lab: last console lines:"
    tail -n 30 "$CONSOLE" | tr -d '\r' | sed 's/^/  | /'
    sed 's/^/  qemu: /' "$LOGS/qemu.log"
else
    status="${status_line#LAB-SCENARIO-STATUS: }"
    echo "===== END scenario $NAME: status $status (${took}s) ====="
fi
echo "lab console log: $CONSOLE"
echo "scenario output: $SCEN_OUT.txt"
exit "$status"
