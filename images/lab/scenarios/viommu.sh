#!/bin/sh
# The virtual IOMMU scenario (tests/lab.rs runs it; needs `run-scenario.sh --iommu`): the lab's NVMe, bound to
# vfio-pci, behind daxvisor's virtio-iommu (`--device vfio=...,iommu=on`), the Linux guest (Debian 6.12: 6.1 has no
# virtio-iommu) in translated mode with strict unmaps. Two pmem regions on page-cache files (the kernel lets a DMA
# pin reach those): `rf` with `iommu=refuse`, `rc` with `iommu=recall`. The guest side is
# images/linux/viommu-scenario: O_DIRECT reads from the NVMe into a file on each DAX-mounted region, every line
# checked. Here, meanwhile:
#   phase A  punches of rf's spare file (not mapped) proceed and its blocks drop; a punch over the reads' buffer
#            is refused (ETXTBSY naming viommu:nvme0) whenever the device has it mapped
#   phase B  a punch over rc's buffer recalls it: the guest's hook stops the reader, the guest unmaps, the punch
#            proceeds without a fence
#   phase C  the hook ignores the recall: at the deadline the mapping is fenced and the punch proceeds; the VMM
#            serves on
# Throughout, each metrics sample's pinned bytes of the endpoint are checked against its pmem mapped bytes; at the
# end the guest's own trace of its maps is compared with the VMM's counters (bytes mapped plus bytes refused: the
# guest's driver records a map before the device answers, so a MAP refused while a recall runs is in its trace
# too). Lines for the test start `lab: `.
ctl() { daxvisor-ctl --api-socket /tmp/api.sock "$@"; }
metric() { # NAME LABEL=VALUE: the value in the last scrape (labels also carry the VM's name)
    grep "^$1{" /tmp/metrics | grep -F "$2" | head -n 1 | awk '{ print $NF }'
}
sample() { # WHEN: pinned bytes against the pmem regions' mapped bytes, from one scrape
    ctl metrics >/tmp/metrics 2>&1 || { echo "lab: sample $1: metrics failed"; return; }
    p=$(metric daxvisor_viommu_endpoint_pinned_bytes 'endpoint="nvme0"')
    a=$(metric daxvisor_viommu_region_mapped_bytes 'region="rf"')
    b=$(metric daxvisor_viommu_region_mapped_bytes 'region="rc"')
    echo "lab: sample $1: pinned ${p:-none} mapped $(( ${a:-0} + ${b:-0} ))"
}
log() { sed 's/\x1b\[[0-9;]*m//g' /tmp/guest.log | grep -E 'dvguest|daxvisor|WARN|ERROR' | tail -n "$1"; }
wait_for() { # PATTERN SECONDS: the scenario ends here if the VM ends or the guest never gets there
    i=0
    while ! grep -q "$1" /tmp/guest.log && [ $i -lt "$2" ] && kill -0 $pid 2>/dev/null; do sleep 1; i=$((i + 1)); done
    grep -q "$1" /tmp/guest.log && return
    echo "lab: no '$1' after $i s (daxvisor $(kill -0 $pid 2>/dev/null && echo running || echo gone))"
    kill $pid 2>/dev/null
    log 60
    exit 1
}
field() { # WORD after which the number comes, in the guest's offsets line for REGION
    grep "dvguest: offsets $1 " /tmp/guest.log | head -n 1 | sed "s/.* $2 \([0-9]*\).*/\1/"
}
blocks() { stat -c %b "$1"; }
punch_until() { # EVENT TRIES DEADLINE LABEL: punch rc's buffer until the event shows (a read was in flight)
    n=0
    while [ $n -lt "$2" ] && ! ctl events 2>/dev/null | grep -q "$1"; do
        n=$((n + 1))
        ctl punch rc --offset "$buf" --length 2M --deadline "$3" >/tmp/punch 2>&1
        echo "lab: $4 punch $n: exit $?"
    done
}
mailbox() { # LETTER: written through rf's backing file, seen by the guest through its DAX mapping
    printf '%s' "$1" | dd of="$rf" bs=1 seek="$(field rf mailbox)" conv=notrunc 2>/dev/null
}

rf="$LAB_PAGECACHE_MNT/viommu-rf.img"
rc="$LAB_PAGECACHE_MNT/viommu-rc.img"
start=$(date +%s)
daxvisor run --transport pci --device "vfio=$LAB_NVME_DEVICE,id=nvme0,iommu=on" --api-socket /tmp/api.sock \
    --kernel "$LAB_LINUX_VIOMMU_KERNEL" --initrd "$LAB_LINUX_VIOMMU_INITRD" --memory 256 --serial stdout \
    --pmem "file=$rf,size=32M,create=on,id=rf,iommu=refuse,guard=log" \
    --pmem "file=$rc,size=32M,create=on,id=rc,iommu=recall,guard=log" \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet iommu.passthrough=0 iommu.strict=1 dvagent_hook=/tmp/hook.sh -- viommu-scenario" \
    >/tmp/guest.log 2>&1 &
pid=$!
(tail -f /tmp/guest.log | sed 's/^/guest| /' >/dev/console) 2>/dev/null &

wait_for 'dvguest: phase A' 240
echo "lab: phase A after $(( $(date +%s) - start )) s"
sleep 2
sample A1
spare=$(field rf spare)
buf=$(field rf buf)
for n in 1 2 3; do
    before=$(blocks "$rf")
    ctl punch rf --offset $((spare + (n - 1) * 1048576)) --length 1M >/tmp/punch 2>&1
    echo "lab: punch beside $n: exit $? blocks $before -> $(blocks "$rf")"
    sample A$((n + 1))
done
n=0
while [ $n -lt 60 ]; do
    n=$((n + 1))
    if ! ctl punch rf --offset "$buf" --length 2M >/tmp/punch 2>&1 && grep -q ETXTBSY /tmp/punch; then
        echo "lab: punch over the reads (try $n): $(tr '\n' ' ' </tmp/punch)"
        break
    fi
done
sample A5
mailbox B

wait_for 'dvguest: phase B' 120
sleep 2
sample B1
buf=$(field rc buf)
punch_until dma-recall 30 20s recall
wait_for 'dvguest: phase B: reader stopped' 60
ctl events 2>&1 | grep -E 'dma-recall|dma-fenced' | sed 's/^/lab: B event /'
sample B2

wait_for 'dvguest: phase C' 60
sleep 2
sample C1
# The guest's driver unmaps each buffer as soon as its read completes, and no new MAP gets in while a recall
# runs, so a deadline longer than one read always finds the range unmapped: a short one finds a read in flight.
punch_until dma-fenced 40 1ms fence
ctl events 2>&1 | grep -E 'dma-fenced' | sed 's/^/lab: C event /'
sleep 5
sample C2
ctl vm >/dev/null 2>&1
echo "lab: the API after the fence: exit $?"
mailbox D

wait_for 'dvguest: trace: ' 120
sample end
ctl viommu | sed 's/^/lab: viommu| /'
grep -E '^daxvisor_viommu_(region_(maps|unmaps|bytes_mapped|refused|bytes_refused)|fences|recalls|requests_answered)' /tmp/metrics |
    sed 's/^/lab: metric /'
for what in mapped refused; do
    echo "lab: host bytes $what rf+rc $(( $(metric daxvisor_viommu_region_bytes_${what}_total 'region="rf"') + \
        $(metric daxvisor_viommu_region_bytes_${what}_total 'region="rc"') ))"
done
mailbox E
wait_for 'dvguest: guest done' 60
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
kill $pid 2>/dev/null
wait $pid
echo "lab: daxvisor exit $? after $(( $(date +%s) - start )) s"
# The guest's markers (not each zeroed read) and daxvisor's warnings and errors.
sed 's/\x1b\[[0-9;]*m//g' /tmp/guest.log | grep -E 'dvguest: |WARN|ERROR' | grep -v 'dma-read loop: read [0-9]* at [0-9]*: some lines zeroed'
