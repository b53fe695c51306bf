//! End-to-end: boot guests with the real daxvisor binary on real KVM, and feed it the bad input users do.

// End-to-end tests: helpers fail the calling test with their message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use daxvisor_tests::{
    asm_exit, assemble_guest, daxvisor, daxvisor_as_nobody, daxvisor_bin, run_with_timeout,
    share_read_only,
};
use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

fn one_line_error(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("daxvisor: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error line, got:\n{stderr}"
    );
    errors[0]
}

#[test]
fn missing_kernel_is_a_one_line_error_with_exit_code_2() {
    let r = daxvisor(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    let line = one_line_error(&r.stderr);
    assert!(
        line.contains("/nonexistent/vmlinuz") && line.contains("No such file"),
        "{line}"
    );
}

#[test]
fn a_directory_as_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = daxvisor(&["run", "--kernel", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        one_line_error(&r.stderr).contains("is a directory"),
        "{}",
        r.stderr
    );
}

#[test]
fn wrong_format_kernel_is_refused_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let serial = dir.path().join("serial.log");
    let r = daxvisor(&[
        "run",
        "--kernel",
        junk.to_str().unwrap(),
        "--serial",
        serial.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        one_line_error(&r.stderr).contains("not a bzImage or a 64-bit ELF"),
        "{}",
        r.stderr
    );
    assert!(
        !serial.exists(),
        "a refused start must not create the serial log"
    );
}

#[test]
fn too_little_memory_is_refused() {
    let r = daxvisor(&["run", "--memory", "4"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        one_line_error(&r.stderr).contains("too little"),
        "{}",
        r.stderr
    );
}

#[test]
fn no_dev_kvm_is_a_clear_error() {
    // A private mount namespace with an empty /dev: the real "this machine has no /dev/kvm" condition.
    let bin = daxvisor_bin();
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble_guest(dir.path(), "exit0", &asm_exit(0));
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --serial none --kernel {}",
        bin.display(),
        elf.display()
    );
    let probe = Command::new("unshare").args(["--mount", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        daxvisor_tests::missing_prerequisite(
            "unshare --mount is not permitted here; cannot hide /dev/kvm",
        );
        return;
    }
    let r = run_with_timeout(
        Command::new("unshare").args(["--mount", "sh", "-c", &script]),
        Duration::from_secs(30),
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    let line = one_line_error(&r.stderr);
    assert!(
        line.contains("/dev/kvm") && line.contains("No such file"),
        "{line}"
    );
}

#[test]
fn no_permission_on_dev_kvm_is_a_clear_error() {
    // /dev/kvm is root-only (crw-------) on this machine; run as nobody.
    let dir = tempfile::tempdir().unwrap();
    let elf = assemble_guest(dir.path(), "exit0", &asm_exit(0));
    share_read_only(dir.path());
    let args = ["run", "--serial", "none", "--kernel"].map(OsStr::new);
    let Some(r) = daxvisor_as_nobody(&[&args[..], &[elf.as_os_str()]].concat()) else {
        return;
    };
    assert_eq!(r.code, Some(2), "{r:?}");
    let line = one_line_error(&r.stderr);
    assert!(
        line.contains("/dev/kvm") && line.contains("Permission denied"),
        "{line}"
    );
}

#[test]
fn a_freestanding_guest_chooses_the_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    for status in [0u32, 7, 255] {
        let elf = assemble_guest(dir.path(), &format!("exit{status}"), &asm_exit(status));
        let r = daxvisor(&["run", "--kernel", elf.to_str().unwrap()]);
        assert_eq!(r.code, Some(status as i32), "{r:?}");
    }
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    let dir = tempfile::tempdir().unwrap();
    // ud2 with no IDT: #UD -> #DF -> triple fault.
    let elf = assemble_guest(dir.path(), "ud2", "  mov $0x1234, %rbx\n  ud2\n");
    let r = daxvisor(&["run", "--kernel", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("triple fault"), "{}", r.stderr);
    assert!(
        r.stderr.contains("rip=0x0000000000100007") && r.stderr.contains("rbx=0x1234"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_emulation_failure_is_reported_with_registers() {
    let dir = tempfile::tempdir().unwrap();
    // Executing from the MMIO hole (no memory slot behind it) is an instruction fetch KVM cannot emulate.
    let elf = assemble_guest(
        dir.path(),
        "mmiojump",
        "  mov $0xc0000000, %rax\n  jmp *%rax\n",
    );
    let r = daxvisor(&["run", "--kernel", elf.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("KVM could not emulate"), "{}", r.stderr);
    assert!(r.stderr.contains("rip=0x00000000c0000000"), "{}", r.stderr);
}

#[test]
fn unclaimed_ports_and_mmio_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!(
        "  mov $0x1234, %dx\n  mov $0x55, %al\n  out %al, %dx\n  in %dx, %al\n\
         \x20 mov $0xc0001000, %rbx\n  movl $0xdeadbeef, (%rbx)\n  mov (%rbx), %ecx\n\
         \x20 cmp $0xffffffff, %ecx\n  jne 1f\n{}1:\n{}",
        asm_exit(42),
        asm_exit(9)
    );
    let elf = assemble_guest(dir.path(), "pokes", &src);
    let r = daxvisor(&["run", "--kernel", elf.to_str().unwrap()]);
    // 42: the unclaimed MMIO read returned all ones, as on real hardware, and the VM kept running.
    assert_eq!(r.code, Some(42), "{r:?}");
}

#[test]
fn guest_reset_and_acpi_power_off_end_the_vm_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // i8042 "pulse reset line" (what Linux `reboot` does with reboot=k), then ACPI S5 (Linux `poweroff`).
    for (name, port, value) in [("reset", 0x64, 0xfe), ("poweroff", 0x600, (5 << 2) | 0x20)] {
        let src = format!(
            "  mov ${port}, %dx\n  mov ${value}, %al\n  out %al, %dx\n{}",
            asm_exit(99)
        );
        let elf = assemble_guest(dir.path(), name, &src);
        let r = daxvisor(&["run", "--kernel", elf.to_str().unwrap()]);
        // 0, not 99: the VM ended at the reset/power-off, before the guest reached its exit-port write.
        assert_eq!(r.code, Some(0), "{name}: {r:?}");
    }
}

#[test]
fn the_default_test_guest_boots_probes_its_devices_and_exits_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pmem.img");
    let pmem = format!("file={},size=2M,create=on", img.display());
    for (cmdline, status) in [("exit=0", 0), ("exit=23", 23)] {
        let r = daxvisor(&["run", "--pmem", &pmem, "--cmdline", cmdline]);
        assert_eq!(r.code, Some(status), "{r:?}");
        let lines = daxvisor_tests::guest_lines(&r.stdout);
        assert_eq!(lines.first(), Some(&"hello"), "{}", r.stdout);
        assert!(
            lines.contains(&"bootinfo ok: 3 memory ranges, 2 devices, 1 cpus"),
            "{}",
            r.stdout
        );
        assert!(
            lines.iter().any(|l| l
                .starts_with("virtio-mmio 0 base=0xd0000000 irq=5: version 2 device 27 (pmem)")),
            "{}",
            r.stdout
        );
        // The virtio-console (guest console and agent port) comes after the pmem devices.
        assert!(
            lines.iter().any(|l| l
                .starts_with("virtio-mmio 1 base=0xd0001000 irq=6: version 2 device 3 (console)")),
            "{}",
            r.stdout
        );
        assert!(
            lines.contains(&"probed 2 virtio-mmio devices"),
            "{}",
            r.stdout
        );
        assert_eq!(
            lines.last(),
            Some(&format!("exit {status}").as_str()),
            "{}",
            r.stdout
        );
    }
}

#[test]
fn the_test_guest_with_no_arguments_boots_on_defaults() {
    let r = daxvisor(&["run"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let lines = daxvisor_tests::guest_lines(&r.stdout);
    assert_eq!(lines.first(), Some(&"hello"));
    assert!(
        lines.contains(&"probed 1 virtio-mmio devices"),
        "{}",
        r.stdout
    );
}

#[test]
fn two_vcpus_boot() {
    let r = daxvisor(&["run", "--cpus", "2", "--cmdline", "exit=4"]);
    assert_eq!(r.code, Some(4), "{r:?}");
    assert!(r.stdout.contains("1 devices, 2 cpus"), "{}", r.stdout);
}
