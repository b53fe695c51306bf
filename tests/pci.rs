//! virtio over PCI end to end: the real daxvisor binary with `--transport pci` on this machine's KVM, the test
//! guest enumerating the bus through ECAM, sizing BAR 0 and programming MSI-X from ring 3, real backing files.
//! Each user-visible behaviour is run over both transports where it exists on both.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use daxvisor_tests::{daxvisor, guest_lines, pattern_mismatches};

const MIB: usize = 1 << 20;

/// A pmem write/flush/read-back session over `transport`; returns the guest lines and the VMM's log.
fn write_session(transport: &str, extra_cmdline: &str) -> (Vec<String>, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let pmem = format!("file={},size=4M,create=on", img.display());
    let cmdline = format!("{extra_cmdline} pmem=write seed=11");
    let r = daxvisor(&[
        "run",
        "--transport",
        transport,
        "--pmem",
        &pmem,
        "--cmdline",
        cmdline.trim(),
    ]);
    assert_eq!(r.code, Some(0), "{transport}: {r:?}");
    let lines = guest_lines(&r.stdout)
        .into_iter()
        .map(str::to_owned)
        .collect();
    (lines, r.stderr, std::fs::read(&img).unwrap())
}

fn has(lines: &[String], want: &str) -> bool {
    lines.iter().any(|l| l == want)
}

#[test]
fn the_guest_finds_pmem_on_either_transport_and_its_flushed_pattern_is_in_the_host_file() {
    for transport in ["mmio", "pci"] {
        let (lines, _, bytes) = write_session(transport, "");
        for want in [
            "pmem0 wrote 4194304 bytes seed 11",
            "pmem0 flush ok",
            "pmem0 readback ok",
        ] {
            assert!(
                has(&lines, want),
                "{transport}: missing {want:?} in {lines:#?}"
            );
        }
        assert_eq!(bytes.len(), 4 * MIB);
        assert_eq!(pattern_mismatches(&bytes, 11, 4 * MIB), 0, "{transport}");
        let on = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        match transport {
            "mmio" => {
                assert!(on("pmem0 at virtio-mmio 0:"), "{lines:#?}");
                assert!(!on("pci "), "{lines:#?}");
            }
            _ => {
                // ECAM enumeration: pmem and console as virtio functions, BAR 0 sized, MSI-X programmed.
                assert!(
                    has(&lines, "mem base=0xe0000000 size=0x100000 pci-ecam"),
                    "{lines:#?}"
                );
                assert!(
                    on("pci 00:01.0 vendor 0x1af4 device 0x105b bar0=0xc0000000 size=0x8000 msix=2 vectors"),
                    "{lines:#?}"
                );
                assert!(on("pci 00:02.0 vendor 0x1af4 device 0x1043 "), "{lines:#?}");
                assert!(has(&lines, "probed 2 virtio-pci devices"), "{lines:#?}");
                assert!(on("pmem0 at virtio-pci 1:"), "{lines:#?}");
                // The queue's MSI-X vector reached the local APIC through KVM's GSI route and the irqfd; a
                // masked entry held its interrupt in the PBA until unmasked.
                assert!(
                    has(&lines, "pmem0 msix vector 0x40 delivered"),
                    "{lines:#?}"
                );
                assert!(
                    has(&lines, "pmem0 msix masked: pending bit set, not delivered"),
                    "{lines:#?}"
                );
                assert!(
                    has(&lines, "pmem0 msix unmasked: delivered, pending bit clear"),
                    "{lines:#?}"
                );
            }
        }
    }
}

#[test]
fn the_agent_and_the_console_port_work_on_either_transport() {
    for transport in ["mmio", "pci"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("hello.img");
        let console = dir.path().join("console.log");
        let pmem = format!("file={},size=2M,create=on", img.display());
        let r = daxvisor(&[
            "run",
            "--transport",
            transport,
            "--pmem",
            &pmem,
            "--console",
            console.to_str().unwrap(),
            "--cmdline",
            "agent=hello",
        ]);
        assert_eq!(r.code, Some(0), "{transport}: {r:?}");
        let lines = guest_lines(&r.stdout);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("agent hello version=1 session=1")),
            "{transport}: {lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("agent region ")
                    && l.contains("size=0x200000 kind=1 name=pmem0")),
            "{transport}: {lines:#?}"
        );
        assert_eq!(
            std::fs::read_to_string(&console).unwrap(),
            "daxvisor-testguest: hello on the virtio console\n",
            "{transport}: console file"
        );
    }
}

#[test]
fn garbage_in_pci_config_space_bars_and_msix_tables_leaves_the_vmm_serving_the_pmem_device() {
    let (lines, log, bytes) = write_session("pci", "pci=hostile");
    let hostile = lines
        .iter()
        .find(|l| l.starts_with("pci hostile: "))
        .unwrap_or_else(|| panic!("{lines:#?}"));
    // The host bridge and the console function (at least) took the garbage.
    assert!(hostile.ends_with("to 2 functions"), "{hostile}");
    for want in [
        "pmem0 flush ok",
        "pmem0 readback ok",
        "pmem0 msix vector 0x40 delivered",
        "pmem0 msix unmasked: delivered, pending bit clear",
        "exit 0",
    ] {
        assert!(has(&lines, want), "missing {want:?} in {lines:#?}");
    }
    assert_eq!(pattern_mismatches(&bytes, 11, 4 * MIB), 0);
    assert!(!log.contains("ERROR"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn pci_hostile_needs_the_pci_transport() {
    let r = daxvisor(&["run", "--cmdline", "pci=hostile"]);
    assert_eq!(r.code, Some(12), "{r:?}");
    assert!(
        guest_lines(&r.stdout)
            .iter()
            .any(|l| l.starts_with("FAIL pci=hostile: no PCI bus")),
        "{r:?}"
    );
}

/// Passthrough's bad input, as an operator meets it on this machine (no IOMMU; its PCI devices are bound to
/// virtio-pci or to nothing): a device not bound to vfio-pci, a path that is no device, a pmem region asking for
/// DMA without a device, a device without `--transport pci`. Each is a start error (exit 2) naming the cause and
/// the remedy, and nothing is left behind (the `create=on` file is removed again).
#[test]
fn passthrough_bad_input_is_a_start_error_naming_cause_and_remedy() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    let pmem = format!("file={},size=4M,create=on,dma=agent", img.display());
    let Some(dev) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut rd| rd.find_map(|e| e.ok()))
        .map(|e| e.path())
    else {
        daxvisor_tests::missing_prerequisite("a PCI device in /sys/bus/pci/devices");
        return;
    };
    let device = format!("vfio={},id=nvme0", dev.display());
    // Each start below is refused with exit 2, and its message names `want`.
    let refused = |args: &[&str], want: &str| {
        let r = daxvisor(args);
        assert_eq!(r.code, Some(2), "{r:?}");
        assert!(r.stderr.contains(want), "{}", r.stderr);
    };
    let r = daxvisor(&[
        "run",
        "--transport",
        "pci",
        "--device",
        &device,
        "--pmem",
        &pmem,
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        (r.stderr.contains("not bound to vfio-pci") && r.stderr.contains("driver_override"))
            || r.stderr.contains("intel_iommu=on"),
        "{}",
        r.stderr
    );
    assert!(!img.exists(), "the create=on file was left behind");

    refused(
        &[
            "run",
            "--transport",
            "pci",
            "--device",
            "vfio=/sys/bus/pci/devices/0000:ff:1f.7",
        ],
        "no such PCI device",
    );

    refused(
        &["run", "--transport", "pci", "--pmem", &pmem],
        "dma=agent|whole needs a passthrough device",
    );

    refused(&["run", "--device", &device], "needs --transport pci");

    // The virtual IOMMU: iommu= on a region without a device behind it; dma=agent beside it; two devices.
    let recall = format!(
        "file={},size=4M,create=on,iommu=recall,id=data",
        img.display()
    );
    refused(
        &["run", "--transport", "pci", "--pmem", &recall],
        "--pmem id=data: iommu=recall needs a passthrough device with iommu=on",
    );
    let behind = format!("{device},iommu=on");
    refused(
        &[
            "run",
            "--transport",
            "pci",
            "--device",
            &behind,
            "--pmem",
            &pmem,
        ],
        "dma=agent is for devices without the virtual IOMMU",
    );
    let other = format!("vfio={},id=other,iommu=on", dev.display());
    refused(
        &[
            "run",
            "--transport",
            "pci",
            "--device",
            &behind,
            "--device",
            &other,
        ],
        "exactly one passthrough device",
    );
    assert!(!img.exists(), "the create=on file was left behind");
}
