//! `scripts/peer-bench --table`: the peer table's arithmetic, on a run's raw lines written here (the run itself
//! needs the DAX lab for most of an hour and is not part of the test suite; this checks what the table makes
//! of its output). Per round the ratio daxvisor / QEMU, then the median over the rounds; exits per guest fsync
//! in all and by reason; a figure a round lacks is "-", never a zero that would drag a median down.

// Test code: a failed step fails the test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use daxvisor_tests::lab::repo_root;

fn peer_bench(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(repo_root().join("scripts/peer-bench"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The table's line that starts with these words (columns are padded with spaces).
fn row<'a>(table: &'a str, words: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.starts_with(words))
        .unwrap_or_else(|| panic!("no row {words:?} in:\n{table}"))
        .into_iter()
        .skip(words.len())
        .collect()
}

/// Three rounds, QEMU and daxvisor-pci, one backing; round 3's QEMU exit count went backwards (no measurement).
const RUN: &str = "\
noise the lab prints around the lines
peer-run round=1 backing=fsdax vmm=qemu job=fsync1 iops=10 bw_kib=40 kib=40 exits=900 by=halt:300,io:0,mmio:0,irq:100 syncs=- sync_us=- boot_cs=5000 rss_kib=358400
peer-run round=1 backing=fsdax vmm=daxvisor-pci job=fsync1 iops=20 bw_kib=80 kib=40 exits=400 by=halt:100,io:0,mmio:20,irq:40 syncs=- sync_us=- boot_cs=4000 rss_kib=235520
peer-run round=2 backing=fsdax vmm=qemu job=fsync1 iops=20 bw_kib=80 kib=80 exits=1000 by=halt:400,io:0,mmio:0,irq:120 syncs=- sync_us=- boot_cs=6000 rss_kib=358400
peer-run round=2 backing=fsdax vmm=daxvisor-pci job=fsync1 iops=10 bw_kib=40 kib=80 exits=1200 by=halt:300,io:0,mmio:40,irq:80 syncs=- sync_us=- boot_cs=6000 rss_kib=235520
peer-run round=3 backing=fsdax vmm=qemu job=fsync1 iops=10 bw_kib=40 kib=40 exits=-5 by=halt:-1,io:0,mmio:0,irq:0 syncs=- sync_us=- boot_cs=5000 rss_kib=358400
peer-run round=3 backing=fsdax vmm=daxvisor-pci job=fsync1 iops=15 bw_kib=60 kib=40 exits=400 by=halt:100,io:0,mmio:20,irq:40 syncs=- sync_us=- boot_cs=4500 rss_kib=235520
";

#[test]
fn the_table_gives_each_rounds_ratio_and_the_median_of_them() {
    let out = peer_bench(&["--table"], RUN);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.starts_with("peer table: 3 rounds"), "{table}");
    // 20/10, 10/20, 15/10: the median of the ratios, not the ratio of the medians (which would be 1.0).
    assert_eq!(
        row(&table, &["fsdax", "fsync1", "iops", "daxvisor-pci"]),
        ["2.00", "0.50", "1.50", "1.50"]
    );
    // Lower is better for boot: 4000/5000, 6000/6000, 4500/5000.
    assert_eq!(
        row(&table, &["all", "boot", "to", "init", "daxvisor-pci"]),
        ["0.80", "1.00", "0.90", "0.90"]
    );
    assert_eq!(
        row(&table, &["all", "VMM", "peak", "RSS", "daxvisor-pci"]),
        ["0.66", "0.66", "0.66", "0.66"]
    );
    // The jobs no round ran have no ratio at all.
    assert_eq!(
        row(&table, &["fsdax", "fsync8", "iops", "daxvisor-pci"]),
        ["-", "-", "-", "-"]
    );
    // Medians: QEMU's exits per fsync from rounds 1 and 2 only (round 3's counter went back): 900/10, 1000/20.
    assert_eq!(
        row(&table, &["fsdax", "fsync1", "exits/sync"]),
        ["70.0", "40.0"]
    );
    // By reason, halt/io/mmio/irq/other per fsync: QEMU 30/0/0/10/50 and 20/0/0/6/24; daxvisor-pci 10/0/2/4/24,
    // 15/0/2/4/39, 10/0/2/4/24.
    assert_eq!(
        row(&table, &["fsdax", "fsync1", "h/io/mm/irq/o"]),
        ["25/0/0/8/37", "10/0/2/4/24"]
    );
}

#[test]
fn a_run_without_results_or_a_wrong_argument_is_refused() {
    let out = peer_bench(&["--table"], "the lab failed before any VM ran\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no peer-run lines"));
    let out = peer_bench(&["--rounds", "0"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive whole numbers"));
    let out = peer_bench(&["--frobnicate"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument --frobnicate"));
}
