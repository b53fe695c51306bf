//! The DAX lab: QEMU (TCG) with emulated NVDIMMs and nested SVM, where the host has real fs-dax, device-DAX and
//! its own /dev/kvm. Each test boots the lab, runs a shell session inside it, and checks what it printed.
//! (This machine has no DAX and a KVM that emulates guest ring 0: the lab is where those claims are proven.)

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use daxvisor_tests::lab::{run_scenario, LabOptions, LabOutcome};

fn assert_ok(name: &str, out: &LabOutcome) {
    assert_eq!(
        out.status,
        0,
        "scenario {name} failed with status {}; its output:\n{}\nlab console log: {}",
        out.status,
        out.output,
        out.log_path.display()
    );
}

/// The probe the lab scenarios rely on says "no" where there is no DAX (this host), so its "yes" in the lab means
/// something.
#[test]
fn lab_probe_reports_no_dax_on_this_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-dax");
    let out = Command::new(env!("CARGO_BIN_EXE_lab-probe"))
        .arg("fsdax")
        .arg(&file)
        .output()
        .expect("run lab-probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(!out.status.success(), "lab-probe accepted a non-DAX file");
    assert!(stdout.contains("STATX_ATTR_DAX=no"), "{stdout}");
    assert!(
        stdout.contains("mmap MAP_SHARED_VALIDATE|MAP_SYNC: mmap: Operation not supported"),
        "{stdout}"
    );
}

/// The pattern check used on the lab's pmem backings accepts the test guest's pattern and rejects one changed word.
#[test]
fn lab_probe_pattern_check_finds_a_changed_word() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pattern.bin");
    let len = 64 * 1024;
    let mut bytes: Vec<u8> = (0..len as u64 / 8)
        .flat_map(|i| daxvisor_tests::pattern_word(5, i * 8).to_le_bytes())
        .collect();
    std::fs::write(&file, &bytes).expect("write pattern");
    let probe = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lab-probe"))
            .arg("pattern")
            .arg(&file)
            .args(args)
            .output()
            .expect("run lab-probe")
    };
    let good = probe(&["5", &len.to_string()]);
    assert!(good.status.success(), "{good:?}");
    let wrong_seed = probe(&["6", &len.to_string()]);
    assert!(!wrong_seed.status.success(), "{wrong_seed:?}");
    bytes[4096] ^= 1;
    std::fs::write(&file, &bytes).expect("write changed pattern");
    let changed = probe(&["5", &len.to_string()]);
    assert!(
        String::from_utf8_lossy(&changed.stdout).contains("mismatched words=1"),
        "{changed:?}"
    );
    assert!(!changed.status.success());
    let too_long = probe(&["5", &(2 * len).to_string()]);
    assert!(!too_long.status.success(), "{too_long:?}");
}

const DAX_SESSION: &str = r#"
set -e
echo "fs-dax mount: $(grep " $LAB_DAX_MNT " /proc/mounts)"
lab-probe fsdax "$LAB_DAX_MNT/probe.bin"
lab-probe devdax "$LAB_DEVDAX"
ls -l "$LAB_DEVDAX" /dev/kvm
test -c /dev/kvm && echo "kvm: /dev/kvm is a character device"
"#;

fn check_dax_session(name: &str, out: &LabOutcome, fs: &str, dax_opt: &str) {
    assert_ok(name, out);
    let o = &out.output;
    let mount = o
        .lines()
        .find(|l| l.starts_with("fs-dax mount: "))
        .unwrap_or_else(|| panic!("no mount line:\n{o}"));
    assert!(
        mount.contains(&format!(" {fs} ")) && mount.contains(dax_opt),
        "expected {fs} with {dax_opt}: {mount}"
    );
    assert!(o.contains("STATX_ATTR_DAX=yes"), "{o}");
    assert!(o.contains("mmap MAP_SHARED_VALIDATE|MAP_SYNC: ok"), "{o}");
    let devdax = o
        .lines()
        .find(|l| l.starts_with("devdax: /dev/dax"))
        .unwrap_or_else(|| panic!("no devdax line:\n{o}"));
    let size: u64 = devdax
        .split_whitespace()
        .find_map(|w| w.strip_prefix("size="))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {devdax:?}"));
    // The lab's device-DAX NVDIMM is 256 MiB; the pfn metadata and alignment take a little of it.
    assert!(
        size > 200 << 20 && size <= 256 << 20,
        "device-DAX size {size} out of range"
    );
    assert!(
        o.contains("devdax: mmap 2097152 bytes MAP_SHARED: ok"),
        "{o}"
    );
    assert!(o.contains("kvm: /dev/kvm is a character device"), "{o}");
}

#[test]
fn ext4_dax_file_maps_with_map_sync_and_devdax_and_kvm_exist() {
    let name = "dax-ext4";
    let Some(out) = run_scenario(name, DAX_SESSION, &LabOptions::default()) else {
        return;
    };
    check_dax_session(name, &out, "ext4", "dax");
}

#[test]
fn xfs_dax_always_file_maps_with_map_sync() {
    let name = "dax-xfs";
    let opts = LabOptions {
        xfs: true,
        ..LabOptions::default()
    };
    let Some(out) = run_scenario(name, DAX_SESSION, &opts) else {
        return;
    };
    check_dax_session(name, &out, "xfs", "dax=always");
}

#[test]
fn daxvisor_boots_the_test_guest_on_the_labs_kvm() {
    let name = "testguest";
    let script = r#"
timeout 120 daxvisor run --serial stdout
echo "daxvisor exit status: $?"
"#;
    let Some(out) = run_scenario(name, script, &LabOptions::default()) else {
        return;
    };
    assert_ok(name, &out);
    assert!(out.output.contains("daxvisor-testguest"), "{}", out.output);
    assert!(
        out.output.contains("daxvisor exit status: 0"),
        "{}",
        out.output
    );
}

/// The test guest writes its pattern through two virtio-pmem devices at once, one backed by a file on the lab's
/// fs-dax mount and one by its device-DAX; after the VM exits the lab reads the pattern from both backings.
#[test]
fn test_guest_writes_through_pmem_on_fsdax_and_devdax_backings() {
    let name = "testguest-pmem";
    let script = r#"
timeout 120 daxvisor run --serial stdout \
    --pmem "file=$LAB_DAX_MNT/tg.img,size=4M,create=on" --pmem "file=$LAB_DEVDAX,size=4M" \
    --cmdline "pmem=write seed=7 size=4M" >/tmp/tg.log 2>&1
rc=$?
sed 's/\x1b\[[0-9;]*m//g' /tmp/tg.log
echo "daxvisor exit status: $rc"
set -e
lab-probe pattern "$LAB_DAX_MNT/tg.img" 7 4194304
lab-probe pattern "$LAB_DEVDAX" 7 4194304
"#;
    let Some(out) = run_scenario(name, script, &LabOptions::default()) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    // daxvisor saw what the backings are: fs-dax mapped with MAP_SYNC, and device-DAX.
    assert!(o.contains("kind=fsdax"), "{o}");
    assert!(o.contains("MAP_SYNC"), "{o}");
    assert!(o.contains("kind=devdax"), "{o}");
    assert!(o.contains("daxvisor exit status: 0"), "{o}");
    assert!(
        o.contains("pattern: /mnt/dax/tg.img seed=7 len=4194304 mismatched words=0"),
        "{o}"
    );
    assert!(
        o.lines().any(|l| l.starts_with("pattern: /dev/dax")
            && l.ends_with("seed=7 len=4194304 mismatched words=0")),
        "{o}"
    );
}

/// Started right after a Linux-guest session's daxvisor (`$pid`, `$start`): the guest's log goes to the lab
/// console as it comes, and a heartbeat each second names daxvisor's state. A session that hits the lab's hard
/// timeout then shows in the console log how far the guest got and when the lab itself stopped (see "Known
/// problem" in images/lab/README.md).
const SESSION_WATCH: &str = r#"(tail -f /tmp/guest.log | sed 's/^/guest| /' >/dev/console) 2>/dev/null &
(while kill -0 $pid 2>/dev/null; do
    echo "lab: session +$(( $(date +%s) - start ))s, daxvisor $(grep '^State' /proc/$pid/status 2>/dev/null)" >/dev/console
    sleep 1
done) &
"#;

/// The end of a Linux-guest session script (`$pid` the background daxvisor, `$start` when it started): stops
/// daxvisor if it still runs, prints the guest's log without colour codes, then daxvisor's exit status.
const SESSION_END: &str = r#"if kill -0 $pid 2>/dev/null; then
    echo "lab: daxvisor still running after $(( $(date +%s) - start ))s: stopped"
    kill -9 $pid
fi
wait $pid
rc=$?
sed 's/\x1b\[[0-9;]*m//g' /tmp/guest.log
echo "lab: daxvisor exit status $rc after $(( $(date +%s) - start ))s"
"#;

/// Runs daxvisor in the background on the Linux guest image and stops it at the latest LIMIT seconds after start,
/// or 3 s after the guest printed STOP_AT (the guest resets by itself when its init is done; a guest that hangs
/// must not hold the session until the lab's hard timeout).
fn linux_session(daxvisor_args: &str, stop_at: &str, limit_s: u32, after: &str) -> String {
    format!(
        r#"
start=$(date +%s)
daxvisor run --kernel "$LAB_LINUX_KERNEL" --initrd "$LAB_LINUX_INITRD" --memory 256 --serial stdout {daxvisor_args} \
    >/tmp/guest.log 2>&1 &
pid=$!
{SESSION_WATCH}seen=
while kill -0 $pid 2>/dev/null && [ $(( $(date +%s) - start )) -lt {limit_s} ]; do
    if [ -z "$seen" ] && grep -q '{stop_at}' /tmp/guest.log; then seen=$(date +%s); fi
    [ -n "$seen" ] && [ $(( $(date +%s) - seen )) -ge 3 ] && break
    sleep 1
done
{SESSION_END}{after}
"#
    )
}

#[test]
fn linux_guest_image_without_pmem_says_so_and_resets() {
    let name = "linux-no-pmem";
    let script = linux_session(
        r#"--cmdline "console=ttyS0 reboot=k panic=1""#,
        "dvguest: status",
        150,
        "",
    );
    let Some(out) = run_scenario(name, &script, &LabOptions::default()) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    assert!(o.contains("dvguest: init reached"), "{o}");
    // The guest found daxvisor's ACPI tables (the virtio-mmio devices are described there as LNRO0005).
    assert!(o.contains("ACPI: DSDT"), "{o}");
    // No --pmem: the only virtio-mmio device is the virtio-console (console and agent port); the init says
    // there is no pmem, then resets the machine, which ends the VM.
    assert!(
        o.contains("dvguest: virtio-mmio platform devices: 1"),
        "{o}"
    );
    assert!(o.contains("dvguest: status no-pmem"), "{o}");
    assert!(o.contains("lab: daxvisor exit status 0"), "{o}");
}

#[test]
fn linux_guest_writes_through_dax_pmem_backed_by_a_lab_fsdax_file() {
    let name = "linux-pmem";
    let token = format!("daxvisor-lab-token-{}", std::process::id());
    let script = linux_session(
        &format!(
            r#"--pmem file=$LAB_DAX_MNT/vm1.img,size=64M,create=on --cmdline "console=ttyS0 reboot=k panic=1 quiet -- echo {token} > hello.txt && sync""#
        ),
        "dvguest: status",
        200,
        &format!(
            r#"
lab-probe fsdax "$LAB_DAX_MNT/statx-check.bin" | grep STATX_ATTR_DAX
if grep -q -a '{token}' "$LAB_DAX_MNT/vm1.img"; then echo "lab: backing file holds the guest's bytes"; fi
"#
        ),
    );
    let opts = LabOptions {
        timeout: Duration::from_secs(300),
        ..LabOptions::default()
    };
    let Some(out) = run_scenario(name, &script, &opts) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    assert!(o.contains("dvguest: init reached"), "{o}");
    // The device was found through ACPI (the VMM's virtio_mmio.device= words land behind `--`, so the kernel
    // does not use them) and bound to virtio_pmem.
    assert!(
        o.lines()
            .any(|l| l.contains("dvguest: virtio-mmio platform device") && l.contains("LNRO0005")),
        "{o}"
    );
    assert!(o.contains("id 0x001b driver virtio_pmem"), "{o}");
    assert!(
        o.contains("(ext4, dax)"),
        "guest did not mount the pmem device with DAX:\n{o}"
    );
    assert!(o.contains("dvguest: status 0"), "{o}");
    assert!(o.contains("lab: daxvisor exit status 0"), "{o}");
    assert!(o.contains("STATX_ATTR_DAX=yes"), "{o}");
    assert!(
        o.contains("lab: backing file holds the guest's bytes"),
        "{o}"
    );
}

/// The seed's problem, on real fs-dax: a range of a MAP_SYNC-mapped file is pinned through the mapper, and a
/// punch through the mapper fails with ETXTBSY naming the holder while the mapped data stays intact; the bare
/// kernel lets the same punch succeed on a mapped, mlocked range and the mapping reads zeros. Device-DAX refuses
/// layout leases with EOPNOTSUPP.
#[test]
fn the_mapper_refuses_a_punch_over_a_pinned_fsdax_range_that_the_bare_kernel_allows() {
    let name = "mapper-seed";
    let script = r#"
daxvisor-mapper-demo "$LAB_DAX_MNT/seed.img" 4
echo "demo fsdax status: $?"
daxvisor-mapper-demo "$LAB_DEVDAX"
echo "demo devdax status: $?"
"#;
    let Some(out) = run_scenario(name, script, &LabOptions::default()) else {
        return;
    };
    assert_ok(name, &out);
    for want in [
        "backing: fsdax",
        "map-sync: yes",
        "mapper-pin: ok",
        "mapper-punch: ETXTBSY holder=owner:1",
        "data-intact: yes",
        "bare-punch: ok",
        "bare-mapping-zeroed: yes",
        "demo fsdax status: 0",
        "devdax: EOPNOTSUPP",
        "demo devdax status: 0",
    ] {
        assert!(
            out.output.contains(want),
            "missing {want:?} in:\n{}",
            out.output
        );
    }
}

/// DMA pins on real VFIO, in the lab with an IOMMU (q35, intel-iommu, the e1000e bound to vfio-pci): the same
/// pin (exclusive lease, pin, VFIO_IOMMU_MAP_DMA at the region's IOVA) on four backings. Device-DAX, memfd and (on
/// the lab's 6.1 kernel) a page-cache file map, and the container then maps the IOVA; fs-dax (mapped MAP_SYNC,
/// plain MAP_SHARED or MAP_PRIVATE) is refused up front naming the rule and the backings that work, and the raw
/// MAP_DMA tried once for the record gets the kernel's own EOPNOTSUPP. A punch over a DMA-mapped range is refused with ETXTBSY naming the DMA owner. Then every way a
/// pin ends removes its IOMMU mapping: unpin, a revoke after a break deadline, owner exit (the container, asked
/// again, maps nothing at the IOVA).
#[test]
fn dma_pins_under_vfio_follow_the_kernel_rule_of_each_backing_and_every_end_unmaps() {
    let name = "dma-pins";
    let script = r#"
echo "kernel=$LAB_KERNEL_VERSION"
dma-probe "$LAB_VFIO_GROUP" pin devdax "$LAB_DEVDAX" || echo "FAILED devdax"
dma-probe "$LAB_VFIO_GROUP" pin memfd - || echo "FAILED memfd"
dma-probe "$LAB_VFIO_GROUP" pin fsdax "$LAB_DAX_MNT/dma.img" || echo "FAILED fsdax"
dma-probe "$LAB_VFIO_GROUP" pin fsdax-shared "$LAB_DAX_MNT/dma.img" || echo "FAILED fsdax-shared"
dma-probe "$LAB_VFIO_GROUP" pin fsdax-private "$LAB_DAX_MNT/dma.img" || echo "FAILED fsdax-private"
dma-probe "$LAB_VFIO_GROUP" pin pagecache "$LAB_PAGECACHE_MNT/dma.img" || echo "FAILED pagecache"
dma-probe "$LAB_VFIO_GROUP" teardown || echo "FAILED teardown"
"#;
    let opts = LabOptions {
        iommu: true,
        ..LabOptions::default()
    };
    let Some(out) = run_scenario(name, script, &opts) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    assert!(!o.contains("FAILED"), "{o}");
    // The lab kernel is pinned (images/lab/lib/kernel.sh): 6.1 pins writable shared page-cache files.
    assert!(o.contains("kernel=6.1."), "{o}");
    let mapped = "pin=ok dma=Some((4294967296, 2097152))";
    for want in [
        "devdax: added: rule=devdax dma-pinnable=yes",
        &format!("devdax: {mapped}"),
        "devdax: pinned: container-maps-iova=yes",
        "devdax: unpinned: container-maps-iova=no recorded=[]",
        "memfd: added: rule=ram-backed dma-pinnable=yes",
        &format!("memfd: {mapped}"),
        "memfd: pinned: container-maps-iova=yes",
        "memfd: punch=ETXTBSY [0x0, 0x1000) is held by owner:2 (dma-ctx) with a pin",
        "memfd: unpinned: container-maps-iova=no recorded=[]",
        "fsdax: backing=fsdax mapping=MAP_SHARED_VALIDATE|MAP_SYNC",
        "fsdax: added: rule=fsdax-never dma-pinnable=no",
        "fsdax: pin=EOPNOTSUPP region:1 (fsdax) cannot be pinned for DMA: the kernel never pins FS-DAX file \
         pages long-term, in any mapping (EOPNOTSUPP); DMA pins work on device-DAX, memfd/shmem",
        "fsdax: refused: container-maps-iova=no recorded=[]",
        "fsdax: raw-map-dma=EOPNOTSUPP",
        // Any mapping of an FS-DAX file: refused up front, and the kernel says the same.
        "fsdax-shared: backing=fsdax mapping=MAP_SHARED",
        "fsdax-shared: pin=EOPNOTSUPP",
        "fsdax-shared: raw-map-dma=EOPNOTSUPP",
        "fsdax-private: backing=fsdax mapping=MAP_PRIVATE",
        "fsdax-private: pin=EOPNOTSUPP",
        "fsdax-private: raw-map-dma=EOPNOTSUPP",
        "pagecache: backing=regular mapping=MAP_SHARED",
        "pagecache: added: rule=shared-file-writable-before-6.5 dma-pinnable=yes",
        &format!("pagecache: {mapped}"),
        "pagecache: pinned: container-maps-iova=yes",
        "pagecache: punch=ETXTBSY [0x0, 0x1000) is held by owner:2 (dma-ctx) with a pin",
        "pagecache: unpinned: container-maps-iova=no recorded=[]",
        "unpin: pinned: container-maps-iova=yes",
        "unpin: after: container-maps-iova=no recorded=[]",
        "revoke: pinned: container-maps-iova=yes",
        "revoke: revoked-owners=1 pins-with-dma-revoked=1",
        "revoke: after: container-maps-iova=no recorded=[]",
        "exit: pinned: container-maps-iova=yes",
        "exit: after: container-maps-iova=no recorded=[]",
    ] {
        assert!(o.contains(want), "missing {want:?} in:\n{o}");
    }
}

/// The guest agent in the Linux guest image, on a pmem backed by a lab fs-dax file: an application takes a
/// shared lease through `daxvisor-agent lease`; the lab host opens the backing file for writing (the host guard
/// turns it into a whole-file break); the agent's hook runs in the guest with the range and the reason, the lease
/// is released, the host's open proceeds; `daxvisor-agent status` before and after.
#[test]
fn linux_guest_agent_answers_a_break_with_its_hook_and_releases_the_lease() {
    let name = "linux-agent";
    // The guest's part goes through the kernel command line base64-encoded (the kernel strips double quotes and
    // the lab's shell would expand `$`): a hook that reports its environment, the CLI, a held lease.
    let script = [
        r#"
cat >/tmp/agent-guest.sh <<'GUEST'
printf '#!/bin/sh\necho "<2>dvguest: hook region=$DAXVISOR_REGION offset=$DAXVISOR_OFFSET length=$DAXVISOR_LENGTH reason=$DAXVISOR_REASON lease=$DAXVISOR_LEASE" >/dev/kmsg\n' >/tmp/hook.sh
chmod +x /tmp/hook.sh
sleep 2
daxvisor-agent regions
region=$(daxvisor-agent regions --json | grep '"id"' | head -1 | tr -dc 0-9)
daxvisor-agent lease --region "$region" >/tmp/lease.out 2>&1 &
sleep 2
echo status-before
daxvisor-agent status
echo '<2>dvguest: lease held' >/dev/kmsg
i=0
while [ $i -lt 60 ] && ! grep -q released /tmp/lease.out; do sleep 1; i=$((i + 1)); done
cat /tmp/lease.out
echo status-after
daxvisor-agent status
GUEST
guest=$(base64 /tmp/agent-guest.sh | tr -d '\n')
start=$(date +%s)
daxvisor run --kernel "$LAB_LINUX_KERNEL" --initrd "$LAB_LINUX_INITRD" --memory 256 --serial stdout \
    --pmem file=$LAB_DAX_MNT/agent.img,size=64M,create=on,guard=hold \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet dvagent_hook=/tmp/hook.sh -- echo $guest | base64 -d | sh" \
    >/tmp/guest.log 2>&1 &
pid=$!
"#,
        SESSION_WATCH,
        r#"opened=
while kill -0 $pid 2>/dev/null && [ $(( $(date +%s) - start )) -lt 240 ]; do
    if [ -z "$opened" ] && grep -q 'dvguest: lease held' /tmp/guest.log; then
        t0=$(date +%s)
        exec 3<>"$LAB_DAX_MNT/agent.img"
        exec 3>&-
        opened=yes
        echo "lab: foreign open for writing proceeded after $(( $(date +%s) - t0 )) s"
    fi
    sleep 1
done
"#,
        SESSION_END,
    ]
    .concat();
    let opts = LabOptions {
        timeout: Duration::from_secs(360),
        ..LabOptions::default()
    };
    let Some(out) = run_scenario(name, &script, &opts) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    assert!(o.contains("dvguest: agent started on /dev/vport"), "{o}");
    assert!(o.contains("daxvisor-agent: session 1 with daxvisor"), "{o}");
    assert!(o.contains("lab: foreign open for writing proceeded"), "{o}");
    // The hook ran with the whole 64 MiB window (a foreign open is a whole-file break) and the reason.
    assert!(
        o.contains("dvguest: hook region=1 offset=0 length=67108864 reason=host-open"),
        "{o}"
    );
    assert!(o.contains("released lease"), "{o}");
    assert!(o.contains("whole-file break done"), "{o}");
    // status before shows the lease, status after shows none.
    let before = o.split("status-before").nth(1).unwrap_or_default();
    let (before, after) = before.split_once("status-after").unwrap_or_default();
    assert!(before.contains("shared"), "{o}");
    assert!(!after.contains("shared"), "{o}");
    assert!(o.contains("dvguest: status 0"), "{o}");
}

/// The operator API on real fs-dax: daxvisor runs the test guest over a pmem file on the lab's fs-dax mount with
/// `--api-socket`; `daxvisor-ctl` from the lab host sees the region as fsdax, is refused (ETXTBSY naming the
/// operator) while the operator holds the range exclusive, then punches 2 MiB: the file's blocks drop and the
/// punched range reads zeros while the rest keeps the guest's pattern.
#[test]
fn daxvisor_ctl_punches_a_running_vms_fsdax_backing_and_its_blocks_drop() {
    let name = "api-fsdax-punch";
    let script = r#"
img="$LAB_DAX_MNT/api.img"
ctl() { daxvisor-ctl --api-socket /tmp/api.sock "$@"; }
daxvisor run --serial /tmp/serial.log --api-socket /tmp/api.sock \
    --pmem "file=$img,size=8M,create=on,id=dax" --cmdline "pmem=write-flush-spin seed=5" >/tmp/d.log 2>&1 &
pid=$!
for i in $(seq 1 600); do grep -q "spinning until killed" /tmp/serial.log 2>/dev/null && break; sleep 0.2; done
grep "spinning until killed" /tmp/serial.log
ctl --json regions dax | grep '"kind"'
stat -c "blocks-before: %b" "$img"
lease=$(ctl --json lease acquire dax --length 1M --mode exclusive | grep -o '"id": [0-9]*' | grep -o '[0-9]*$')
ctl punch dax --length 64K 2>&1
echo "punch-held status: $?"
ctl lease release "$lease"
ctl punch dax --offset 1M --length 2M
echo "punch status: $?"
stat -c "blocks-after: %b" "$img"
ctl stop
wait $pid
echo "daxvisor exit status: $?"
# Exits 1 when words differ, which they must here: the count is checked below.
lab-probe pattern "$img" 5 8388608
echo "pattern check status: $?"
echo "nonzero bytes in the punched range: $(dd if="$img" bs=1M skip=1 count=2 2>/dev/null | tr -d '\000' | wc -c)"
"#;
    let Some(out) = run_scenario(name, script, &LabOptions::default()) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    for want in [
        "spinning until killed",
        "\"kind\": \"fsdax\"",
        "refused: ETXTBSY",
        "holder: owner",
        "(operator) with a exclusive lease",
        "punch-held status: 3",
        "punch status: 0",
        "daxvisor exit status: 0",
        // 2 MiB of 8-byte words read zeros instead of the pattern; every other word is intact.
        "pattern: /mnt/dax/api.img seed=5 len=8388608 mismatched words=262144",
        "nonzero bytes in the punched range: 0",
    ] {
        assert!(o.contains(want), "missing {want:?} in:\n{o}");
    }
    let blocks = |key: &str| -> u64 {
        o.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{o}"))
    };
    let (before, after) = (blocks("blocks-before:"), blocks("blocks-after:"));
    // st_blocks counts 512-byte sectors: the punch of [1M, 3M) returned 4096 of them (an extent-tree block may
    // stay behind).
    assert!(
        after + 4096 - 128 <= before,
        "blocks {before} -> {after}:\n{o}"
    );
}

/// The operator API with the guest agent, on real fs-dax: the Linux guest writes 0xff over 4 MiB of its pmem
/// (the raw block device, unmounted), and an application holds that range shared through `daxvisor-agent lease`.
/// From the lab host, `daxvisor-ctl punch` asks for the range: the agent's hook runs in the guest with the range
/// and reason `punch`, the lease is released, the punch is done and the fs-dax file's blocks drop; the guest then
/// reads zeros there.
#[test]
fn daxvisor_ctl_punch_asks_the_linux_guest_agent_which_releases_and_reads_zeros_after() {
    let name = "api-linux-agent";
    let script = [
        r#"
cat >/tmp/agent-guest.sh <<'GUEST'
printf '#!/bin/sh\necho "<2>dvguest: hook region=$DAXVISOR_REGION offset=$DAXVISOR_OFFSET length=$DAXVISOR_LENGTH reason=$DAXVISOR_REASON" >/dev/kmsg\n' >/tmp/hook.sh
chmod +x /tmp/hook.sh
cd /
umount /mnt/pmem 2>/dev/null
dev=$(ls /dev/pmem* | head -1)
# From a file, not a pipe: dd would count short reads from a pipe as blocks.
head -c 4194304 /dev/zero | tr '\000' '\377' >/tmp/ff
dd if=/tmp/ff of=$dev bs=1M seek=32 2>/dev/null
sync
echo "<2>dvguest: nonzero before: $(dd if=$dev bs=1M skip=32 count=4 2>/dev/null | tr -d '\000' | wc -c)" >/dev/kmsg
sleep 2
region=$(daxvisor-agent regions --json | grep '"id"' | head -1 | tr -dc 0-9)
daxvisor-agent lease --region "$region" --offset 33554432 --len 4194304 >/tmp/lease.out 2>&1 &
sleep 2
echo '<2>dvguest: lease held' >/dev/kmsg
i=0
while [ $i -lt 120 ] && ! grep -q released /tmp/lease.out; do sleep 1; i=$((i + 1)); done
cat /tmp/lease.out
sleep 1
echo 3 >/proc/sys/vm/drop_caches
echo "<2>dvguest: nonzero after: $(dd if=$dev bs=1M skip=32 count=4 2>/dev/null | tr -d '\000' | wc -c)" >/dev/kmsg
GUEST
guest=$(base64 /tmp/agent-guest.sh | tr -d '\n')
img="$LAB_DAX_MNT/agent-api.img"
ctl() { daxvisor-ctl --api-socket /tmp/api.sock "$@"; }
start=$(date +%s)
daxvisor run --kernel "$LAB_LINUX_KERNEL" --initrd "$LAB_LINUX_INITRD" --memory 256 --serial stdout \
    --pmem "file=$img,size=64M,create=on,id=data" --api-socket /tmp/api.sock \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet dvagent_hook=/tmp/hook.sh -- echo $guest | base64 -d | sh" \
    >/tmp/guest.log 2>&1 &
pid=$!
"#,
        SESSION_WATCH,
        r#"punched=
while kill -0 $pid 2>/dev/null && [ $(( $(date +%s) - start )) -lt 240 ]; do
    if [ -z "$punched" ] && grep -q 'dvguest: lease held' /tmp/guest.log; then
        punched=yes
        ctl owners
        stat -c "blocks-before: %b" "$img"
        ctl punch data --offset 32M --length 4M --deadline-ms 60000
        echo "punch status: $?"
        stat -c "blocks-after: %b" "$img"
    fi
    sleep 1
done
"#,
        SESSION_END,
    ]
    .concat();
    let opts = LabOptions {
        timeout: Duration::from_secs(360),
        ..LabOptions::default()
    };
    let Some(out) = run_scenario(name, &script, &opts) else {
        return;
    };
    assert_ok(name, &out);
    let o = &out.output;
    for want in [
        "dvguest: nonzero before: 4194304",
        "dvguest: hook region=1 offset=33554432 length=4194304 reason=punch",
        "released lease",
        "punch status: 0",
        "dvguest: nonzero after: 0",
        "lab: daxvisor exit status 0",
    ] {
        assert!(o.contains(want), "missing {want:?} in:\n{o}");
    }
    let blocks = |key: &str| -> u64 {
        o.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{o}"))
    };
    let (before, after) = (blocks("blocks-before:"), blocks("blocks-after:"));
    assert!(
        after + 8192 - 128 <= before,
        "blocks {before} -> {after}:\n{o}"
    );
}
