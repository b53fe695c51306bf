//! The documentation runs: every ```sh block of README.md and docs/*.md is run as written, in an empty
//! directory, with the built `daxvisor` and `daxvisor-ctl` on the PATH (a new host has nothing else), and must
//! exit 0. A block is left out only when an HTML comment right above it says why ("not run by tests/docs.rs:
//! REASON"): the build that makes these binaries, the whole test suite, the lab, fuzzing. The Prometheus scrape
//! configuration and alert rules in docs/operator-api.md are checked with Debian's `promtool`.

// Test code: a failed step fails the test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use daxvisor_tests::{daxvisor_bin, missing_prerequisite, run_with_timeout};

const SKIP: &str = "<!-- not run by tests/docs.rs:";

/// A fenced code block: where it is, its language, the comment above it, its text.
struct Block {
    file: PathBuf,
    line: usize,
    lang: String,
    skip_reason: Option<String>,
    text: String,
}

fn blocks(file: &Path) -> Vec<Block> {
    let md = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```").filter(|l| !l.is_empty()) else {
            if lines[i].starts_with("```") {
                // An unlabelled block: skip to its end.
                i += 1;
                while i < lines.len() && !lines[i].starts_with("```") {
                    i += 1;
                }
            }
            i += 1;
            continue;
        };
        let start = i;
        let above = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .copied()
            .unwrap_or("");
        let skip_reason = above
            .strip_prefix(SKIP)
            .and_then(|r| r.strip_suffix("-->"))
            .map(|r| r.trim().to_owned());
        i += 1;
        let mut text = String::new();
        while i < lines.len() && !lines[i].starts_with("```") {
            text.push_str(lines[i]);
            text.push('\n');
            i += 1;
        }
        out.push(Block {
            file: file.to_owned(),
            line: start + 1,
            lang: lang.trim().to_owned(),
            skip_reason,
            text,
        });
        i += 1;
    }
    out
}

fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_shell_example_in_the_readme_and_docs_runs_as_written() {
    let bin_dir = daxvisor_bin().parent().unwrap().to_owned();
    assert!(bin_dir.join("daxvisor-ctl").exists());
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (mut ran, mut skipped) = (Vec::new(), Vec::new());
    for file in documents() {
        for b in blocks(&file).into_iter().filter(|b| b.lang == "sh") {
            let at = format!("{}:{}", b.file.display(), b.line);
            if let Some(reason) = b.skip_reason {
                assert!(!reason.is_empty(), "{at}: a skipped block says why");
                skipped.push(at);
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let r = run_with_timeout(
                Command::new("bash")
                    .args(["-euo", "pipefail", "-c", &b.text])
                    .current_dir(dir.path())
                    .env("PATH", &path)
                    .env("DAXVISOR_SOCKET_DIR", dir.path().join("run"))
                    .env_remove("DAXVISOR_API_SOCKET"),
                Duration::from_secs(180),
            );
            assert_eq!(
                r.code,
                Some(0),
                "{at} failed:\n{}\n--- stdout\n{}\n--- stderr\n{}",
                b.text,
                r.stdout,
                r.stderr
            );
            eprintln!("{at}: ran\n{}", r.stdout);
            ran.push(at);
        }
    }
    eprintln!("ran {} block(s), skipped {:?}", ran.len(), skipped);
    assert!(ran.iter().any(|a| a.contains("operator-api.md")), "{ran:?}");
    assert!(ran.iter().any(|a| a.contains("README.md")), "{ran:?}");
}

#[test]
fn the_sample_prometheus_configuration_and_alert_rules_are_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operator-api.md");
    let yaml: Vec<Block> = blocks(&file)
        .into_iter()
        .filter(|b| b.lang == "yaml")
        .collect();
    assert_eq!(yaml.len(), 2, "a scrape configuration and alert rules");
    if !Path::new("/usr/bin/promtool").exists() {
        missing_prerequisite(
            "promtool (Debian's prometheus package; scripts/setup-host.sh installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for b in yaml {
        let (what, name) = if b.text.starts_with("groups:") {
            ("rules", "rules.yml")
        } else {
            ("config", "prometheus.yml")
        };
        let f = dir.path().join(name);
        std::fs::write(&f, &b.text).unwrap();
        let r = run_with_timeout(
            Command::new("/usr/bin/promtool")
                .args(["check", what])
                .arg(&f),
            Duration::from_secs(60),
        );
        assert_eq!(
            r.code,
            Some(0),
            "{}:{}: promtool check {what}: {r:?}",
            b.file.display(),
            b.line
        );
    }
}
