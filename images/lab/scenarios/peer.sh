#!/bin/sh
# The peer scenario (run by scripts/peer-bench, needs `run-scenario.sh --peer`): the Linux guest image runs the same
# fio jobs (images/linux/peer-fio) under daxvisor (virtio-mmio and --transport pci) and under QEMU 7.2
# (-enable-kvm, virtio-pmem-pci). Each VM gets three pmem devices, one per backing (told apart in the guest by
# their sizes: PEER_SIZE_MIB, +2, +4 MiB), each written in full before every VM so no VMM pays first-touch
# allocation; the guest runs the jobs on one backing after the other, in an order rotated each round:
#   fsdax      a file on the lab's ext4 -o dax (daxvisor maps it MAP_SYNC; QEMU fsyncs it on every guest flush)
#   pagecache  a file on a page-cache ext4 (a loop device in the lab's RAM)
#   tmpfs      a file in tmpfs (the host flush costs nothing for either VMM)
# The VMMs too run in a different order each round (rotated). Per VM it prints one line per backing and fio job:
#   peer-run round=R backing=B vmm=V job=J iops=N bw_kib=N kib=N exits=N|- by=halt:N,io:N,mmio:N,irq:N|-
#            npf=N tlbflush=N hostirq=loc:N,res:N,cal:N,tlb:N syncs=N sync_us=N boot_cs=N rss_kib=N
# boot_cs: centiseconds from starting the VMM to the guest's "dvguest: init reached" line (watched from outside);
# rss_kib: the VMM's peak resident set (VmHWM) as last read before it exited; exits and by: the VM's KVM exits
# (lab debugfs) between the guest's peer-mark start/end of the job, in all and by reason (see vm_exits);
# syncs and sync_us: the host syncs (fsync, fdatasync, msync)
# the VMM made over the job and their summed duration, from `strace -f -T` (with --seccomp-bpf only those
# calls stop the VMM, the same cost per sync for every VMM), so a guest fsync's time splits into the host sync
# and everything else. Settings (environment, set by scripts/peer-bench):
#   PEER_ROUNDS (1) PEER_FIRST_ROUND (1: its number, which sets the orders) PEER_RUNTIME (5 s per job)
#   PEER_VMMS ("daxvisor-mmio daxvisor-pci qemu")
#   PEER_BACKINGS ("fsdax pagecache tmpfs") PEER_SIZE_MIB (128) PEER_LIMIT (seconds per VM, 900)
ROUNDS="${PEER_ROUNDS:-1}"
FIRST_ROUND="${PEER_FIRST_ROUND:-1}"
RUNTIME="${PEER_RUNTIME:-5}"
VMMS="${PEER_VMMS:-daxvisor-mmio daxvisor-pci qemu}"
BACKINGS="${PEER_BACKINGS:-fsdax pagecache tmpfs}"
SIZE_MIB="${PEER_SIZE_MIB:-128}"
LIMIT="${PEER_LIMIT:-900}"
CMDLINE="console=ttyS0 reboot=k panic=1 quiet -- peer-fio $RUNTIME"  # + the backings: NAME:MIB ...

command -v qemu-system-x86_64 >/dev/null || { echo "peer: no qemu-system-x86_64 (run-scenario.sh --peer)"; exit 2; }
echo "peer: $(qemu-system-x86_64 --version | head -n1)"
echo "peer: rounds=$ROUNDS runtime=${RUNTIME}s vmms=$VMMS backings=$BACKINGS size=${SIZE_MIB}MiB"

# KVM exit counts by reason, from the VM's own directory in the lab kernel's debugfs (kvm/PID-FD), so another
# VM's exits never count and the counter cannot go back when a VM ends.
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
KVMDBG=/sys/kernel/debug/kvm
[ -r "$KVMDBG/exits" ] || KVMDBG=
echo "peer: kvm exit counters: ${KVMDBG:-none}"
# The counters of the VM of process $1, then the lab's own interrupts (one VM runs at a time), joined by ":"
# ("-" when there are none):
#   exits all exits to KVM; halt the guest's HLT; io and mmio port and MMIO accesses KVM passed to the VMM's
#   user space (virtio-mmio registers, the serial port; not ioeventfd notifications, which KVM completes
#   itself); irq host interrupts that stopped the guest; pf_fixed guest page faults KVM fixed in its page
#   tables (a mapping the host took away and the guest touched again); remote_tlb_flush KVM's flushes of the
#   guest's TLB (the host changing the VMM's mappings under it);
#   then the lab's interrupts summed over its CPUs: LOC local timer, RES rescheduling, CAL function call and
#   TLB shootdown IPIs (/proc/interrupts).
VM_STATS="exits halt_exits io_exits mmio_exits irq_exits pf_fixed remote_tlb_flush"
vm_exits() {
    d=''
    [ -z "$KVMDBG" ] || d="$(ls -d "$KVMDBG/$1"-* 2>/dev/null | head -n1)"
    [ -n "$d" ] || { echo -; return; }
    v=''
    for f in $VM_STATS; do v="$v:$(cat "$d/$f" 2>/dev/null || echo 0)"; done
    h="$(awk '$1 ~ /^(LOC|RES|CAL|TLB):$/ { t = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) t += $i; c[$1] = t }
        END { printf "%d:%d:%d:%d", c["LOC:"], c["RES:"], c["CAL:"], c["TLB:"] }' /proc/interrupts)"
    echo "${v#:}:$h"
}
# PEER_KVM_TRACE=1: KVM's trace events (exits, injected interrupts and exceptions, IRQ lines) kept in the lab's
# trace buffer over each VM, and the last of them printed when a VM fails (what the guest did before it died).
TRACEFS=
if [ "${PEER_KVM_TRACE:-0}" = 1 ] && [ -d /sys/kernel/debug/tracing/events/kvm ]; then
    TRACEFS=/sys/kernel/debug/tracing
    echo 4096 >"$TRACEFS/buffer_size_kb"
    for e in kvm_exit kvm_inj_virq kvm_inj_exception kvm_set_irq kvm_ioapic_set_irq kvm_pic_set_irq \
        kvm_apic_accept_irq kvm_msi_set_irq kvm_userspace_exit kvm_eoi; do
        echo 1 >"$TRACEFS/events/kvm/$e/enable" 2>/dev/null
    done
fi
echo "peer: kvm trace: ${TRACEFS:-off}"
QEMU_CPU="host,-cx16,-xsave,-avx,-fma,-f16c,-avx2,-avx512f,-avx512dq,-avx512ifma,-avx512cd,-avx512bw,-avx512vl"
# Each VMM's host syncs, timed (PEER_STRACE=0 turns it off).
STRACE=
if [ "${PEER_STRACE:-1}" = 1 ] && command -v strace >/dev/null; then
    STRACE="strace -f -qq -T --seccomp-bpf -e trace=fsync,fdatasync,msync"
fi
echo "peer: host syncs timed with: ${STRACE:-nothing}"

# The page-cache backing: ext4 on a loop device over a file in the lab's RAM.
grep '/loop\.ko' /etc/modules.iommu.order | while read -r m; do insmod "$m" 2>/dev/null; done
mkdir -p /mnt/pagecache /mnt/tmpfs
if ! grep -q ' /mnt/pagecache ' /proc/mounts; then
    dd if=/dev/zero of=/tmp/pagecache.img bs=1M count=0 seek=$((SIZE_MIB + 96)) 2>/dev/null &&
        mkfs.ext4 -q -F -b 4096 /tmp/pagecache.img >/dev/null &&
        mount -t ext4 -o loop /tmp/pagecache.img /mnt/pagecache || { echo "peer: page-cache ext4 failed"; exit 2; }
fi
mount -t tmpfs -o size=$((SIZE_MIB + 32))m tmpfs /mnt/tmpfs || { echo "peer: tmpfs failed"; exit 2; }

backing_path() {
    case "$1" in
    fsdax) echo "$LAB_DAX_MNT/peer.img" ;;
    pagecache) echo /mnt/pagecache/peer.img ;;
    tmpfs) echo /mnt/tmpfs/peer.img ;;
    esac
}
backing_mib() {
    case "$1" in
    fsdax) echo "$SIZE_MIB" ;;
    pagecache) echo $((SIZE_MIB + 2)) ;;
    tmpfs) echo $((SIZE_MIB + 4)) ;;
    esac
}
# The first word of each line rotated left by $1 - 1 places.
rotate() { echo $2 | awk -v r="$1" '{ for (i = 0; i < NF; i++) printf "%s ", $(((i + r - 1) % NF) + 1) }'; }

uptime_cs() { awk '{ split($1, a, "."); print a[1] * 100 + a[2] }' /proc/uptime; }

# One VM: $1 vmm, $2 round, $3 the backings in the order the guest runs them.
run_vm() {
    vmm="$1" round="$2" order="$3"
    dx_pmem='' q_pmem='' specs='' i=0
    for backing in $order; do
        file="$(backing_path "$backing")" mib="$(backing_mib "$backing")"
        rm -f "$file"
        # Written in full (and synced) before the VM, so every VMM finds the same allocated file.
        dd if=/dev/zero of="$file" bs=1M count="$mib" conv=fsync 2>/dev/null || { echo "peer: cannot write $file"; return 1; }
        dx_pmem="$dx_pmem --pmem file=$file,size=${mib}M"
        q_pmem="$q_pmem -object memory-backend-file,id=pm$i,share=on,mem-path=$file,size=${mib}M -device virtio-pmem-pci,memdev=pm$i,id=pmem$i"
        specs="$specs $backing:$mib"
        i=$((i + 1))
    done
    log=/tmp/peer-guest.log marks=/tmp/peer-marks trace=/tmp/peer-strace
    [ -z "$TRACEFS" ] || : >"$TRACEFS/trace"
    : >"$log"
    : >"$marks"
    : >"$trace"
    t0="$(uptime_cs)"
    case "$vmm" in
    daxvisor-mmio | daxvisor-pci)
        transport=mmio
        [ "$vmm" = daxvisor-pci ] && transport=pci
        $STRACE ${STRACE:+-o "$trace"} daxvisor run --kernel "$LAB_LINUX_KERNEL" --initrd "$LAB_LINUX_INITRD" --memory 256 --cpus 1 \
            --serial stdout --transport "$transport" $dx_pmem --cmdline "$CMDLINE$specs" >"$log" 2>&1 &
        ;;
    qemu)
        # shellcheck disable=SC2086 # $q_pmem is a list of options
        # The guest CPU daxvisor gives on a nested host (its nested CPUID mask): no CMPXCHG16B, XSAVE or what
        # needs XSAVE. The same features for both guests, and with them visible the lab's emulated SVM broke its
        # own kernel under QEMU's guest in 4 of 6 VMs on 2026-12-07 (stack overflows in KVM_RUN, soft lockups
        # in KVM's APIC code); masked, 1 of 7 lab boots. daxvisor's VMs met the same stack overflow once that day.
        $STRACE ${STRACE:+-o "$trace"} qemu-system-x86_64 -enable-kvm -cpu "$QEMU_CPU" -smp 1 -m 256M,slots=4,maxmem=2G -M pc \
            -nodefaults -no-reboot -display none -serial "file:$log" \
            -kernel "$LAB_LINUX_KERNEL" -initrd "$LAB_LINUX_INITRD" -append "$CMDLINE$specs" \
            $q_pmem >/tmp/peer-qemu.out 2>&1 &
        ;;
    esac
    pid=$!
    boot= rss=0 nmarks=0
    # Watch from outside: boot to init, the job marks (with the KVM exit counter at each), the peak RSS.
    while kill -0 "$pid" 2>/dev/null; do
        now="$(uptime_cs)"
        # Under strace the VMM is strace's child.
        vpid="$pid"
        [ -n "$STRACE" ] && vpid="$(awk '{ print $1 }' "/proc/$pid/task/$pid/children" 2>/dev/null)"
        if [ -z "$boot" ] && grep -q 'dvguest: init reached' "$log"; then boot=$((now - t0)); fi
        if [ -n "$boot" ]; then
            n="$(grep -c 'dvguest: peer-mark' "$log")"
            if [ "$n" != "$nmarks" ]; then
                e="$(vm_exits "${vpid:-$pid}")"
                t="$(wc -l <"$trace")"
                grep 'dvguest: peer-mark' "$log" | tail -n +$((nmarks + 1)) | while read -r line; do
                    echo "${line##*peer-mark } $e $t"
                done >>"$marks"
                nmarks="$n"
            fi
        fi
        h="$(awk '/^VmHWM:/ { print $2 }' "/proc/${vpid:-$pid}/status" 2>/dev/null)"
        [ -n "$h" ] && rss="$h"
        if [ $(((now - t0) / 100)) -ge "$LIMIT" ]; then
            echo "peer: $vmm: still running after ${LIMIT}s, stopped"
            kill -9 ${vpid:-} "$pid"
            break
        fi
        sleep 0.1
    done
    wait "$pid"
    rc=$?
    tr -d '\r' <"$log" | sed 's/\x1b\[[0-9;]*m//g' >"$log.txt"
    if ! grep -q 'peer-result' "$log.txt" || ! grep -q 'dvguest: status 0' "$log.txt"; then
        echo "peer: $vmm (round $round) failed (exit $rc); its log:"
        sed 's/^/peer|   /' "$log.txt" | tail -n 60
        [ "$vmm" = qemu ] && sed 's/^/peer|   qemu: /' /tmp/peer-qemu.out
        [ -z "$TRACEFS" ] || grep -v '^#' "$TRACEFS/trace" | tail -n 150 | sed 's/^/peer|   kvm: /'
        return 1
    fi
    grep -o 'peer-result .*' "$log.txt" | while read -r _ backing job rest; do
        # The exits over this job: the counter at its end mark minus at its start mark.
        s="$(awk -v j="$backing/$job" '$1 == "start" && $2 == j { print $3 }' "$marks" | tail -n1)"
        f="$(awk -v j="$backing/$job" '$1 == "end" && $2 == j { print $3 }' "$marks" | tail -n1)"
        x="exits=- by=- npf=- tlbflush=- hostirq=-"
        case "$s$f" in *-* | "") ;; *) x="$(echo "$s $f" | awk '{
            n = split($1, a, ":"); split($2, b, ":")
            for (i = 1; i <= n; i++) d[i] = b[i] - a[i]
            printf "exits=%d by=halt:%d,io:%d,mmio:%d,irq:%d npf=%d tlbflush=%d hostirq=loc:%d,res:%d,cal:%d,tlb:%d",
                d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11] }')" ;;
        esac
        # The host syncs over this job: the strace lines between its marks that end with a duration.
        ts="$(awk -v j="$backing/$job" '$1 == "start" && $2 == j { print $4 }' "$marks" | tail -n1)"
        tf="$(awk -v j="$backing/$job" '$1 == "end" && $2 == j { print $4 }' "$marks" | tail -n1)"
        sy="syncs=- sync_us=-"
        if [ -n "$STRACE" ] && [ -n "$ts" ] && [ -n "$tf" ]; then
            sy="syncs=0 sync_us=0"
            # (sed would print line ts+1 even when tf is not past it.)
            [ "$tf" -gt "$ts" ] && sy="$(sed -n "$((ts + 1)),${tf}p" "$trace" | awk '
                match($0, /<[0-9.]+>$/) { n++; t += substr($0, RSTART + 1, RLENGTH - 2) }
                END { printf "syncs=%d sync_us=%d", n, t * 1000000 }')"
        fi
        echo "peer-run round=$round backing=$backing vmm=$vmm job=$job $rest $x $sy boot_cs=${boot:--} rss_kib=$rss"
    done
}

failed=0
r="$FIRST_ROUND"
while [ "$r" -lt $((FIRST_ROUND + ROUNDS)) ]; do
    # Rotate the VMM order (and the backings' order in the guest) each round, so none is always first.
    for vmm in $(rotate "$r" "$VMMS"); do
        echo "peer: round $r, $vmm"
        run_vm "$vmm" "$r" "$(rotate "$r" "$BACKINGS")" || failed=$((failed + 1))
    done
    r=$((r + 1))
done
rm -f "$LAB_DAX_MNT/peer.img" /mnt/pagecache/peer.img /mnt/tmpfs/peer.img
echo "peer: done, $failed failed VM runs"
[ "$failed" = 0 ]
