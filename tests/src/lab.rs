//! Running scenarios in the DAX lab from `cargo test`: QEMU with emulated NVDIMMs (fs-dax and device-DAX) and nested
//! SVM, built by images/lab/build.sh and driven by images/lab/run-scenario.sh (see images/lab/README.md).
//!
//! The lab is built once per test process. When QEMU is missing and cannot be installed, every scenario fails under
//! CI=true and is skipped with a printed message elsewhere; any other problem (a build error, a lab that does not
//! come up) fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to run one scenario.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// XFS with `-o dax=always` on the fs-dax NVDIMM instead of ext4 with `-o dax`.
    pub xfs: bool,
    /// An IOMMU: q35 with intel-iommu and an e1000e bound to vfio-pci, its group in `$LAB_VFIO_GROUP`.
    pub iommu: bool,
    /// The peer archive (`run-scenario.sh --peer`): the pinned QEMU 7.2 for images/lab/scenarios/peer.sh.
    pub peer: bool,
    /// Hard limit for the whole lab run; QEMU is killed past it and the scenario reports status 124.
    pub timeout: Duration,
    /// Host files the scenario needs, found in the lab as /lab/files/NAME.
    pub files: Vec<PathBuf>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            xfs: false,
            iommu: false,
            peer: false,
            timeout: Duration::from_secs(300),
            files: Vec::new(),
        }
    }
}

/// What a scenario did.
#[derive(Debug, Clone)]
pub struct LabOutcome {
    /// The scenario script's exit status; 124 when the timeout hit, 125 when the lab itself failed.
    pub status: i32,
    /// The scenario's own output (stdout and stderr, between the BEGIN/END lines).
    pub output: String,
    /// The lab's console log (kernel and the lab's /init).
    pub log_path: PathBuf,
    /// Wall-clock time of the lab run (boot, setup, scenario, power-off).
    pub elapsed: Duration,
}

/// The repository root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Ok(()) once the lab image is built; Err(message) when the lab cannot run here (QEMU not installable).
fn lab_ready() -> &'static Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY.get_or_init(|| {
        let root = repo_root();
        // Installs QEMU and friends when missing (needs root); quick when all is there.
        let setup = Command::new("bash")
            .arg(root.join("scripts/setup-host.sh"))
            .status();
        if !qemu_present() {
            return Err(format!(
                "qemu-system-x86_64 is not installed and scripts/setup-host.sh could not install it ({setup:?})"
            ));
        }
        let started = Instant::now();
        // With the peer archive (QEMU for the peer scenario): seconds once its packages are cached.
        let status = Command::new("bash")
            .arg(root.join("images/lab/build.sh"))
            .arg("--peer")
            .status()
            .unwrap_or_else(|e| panic!("cannot run images/lab/build.sh: {e}"));
        assert!(status.success(), "images/lab/build.sh failed: {status}");
        println!("lab: image built in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    })
}

fn qemu_present() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run `script` (a /bin/sh script) as scenario `name` in the lab. None when the lab cannot run on this machine
/// (the reason is printed); the caller then returns without asserting anything.
pub fn run_scenario(name: &str, script: &str, opts: &LabOptions) -> Option<LabOutcome> {
    if let Err(why) = lab_ready() {
        crate::missing_prerequisite(&format!("lab scenario {name}: {why}"));
        return None;
    }
    // One lab at a time: each is a software-emulated machine that wants every core, and two at once on a
    // 2-core host slow the emulated clock enough to trip the scenarios' own time limits.
    static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let first = run_once(name, script, opts);
    let Some(why) = lab_flake(&first) else {
        return Some(first);
    };
    // Two failures of the emulated lab itself, each seen rarely (images/lab/README.md, "Known problems"): one
    // more boot tells them from a scenario that fails, and both runs are in the test's output.
    println!(
        "lab: scenario {name}: {why} (exit {}; console log {}); running it once more",
        first.status,
        first.log_path.display()
    );
    Some(run_once(name, script, opts))
}

/// Whether a failed run shows one of the lab's own known failures, and which.
fn lab_flake(run: &LabOutcome) -> Option<&'static str> {
    if run.status == 124 {
        return Some("the lab made no progress until its hard timeout");
    }
    // The nested vCPU reset and then faulted on the reset vector's first instruction: a guest kernel does not
    // run there, so this is the emulated SVM losing the guest's state, not daxvisor or the scenario.
    let reset_vector_fault = run.output.contains("triple fault (KVM_EXIT_SHUTDOWN)")
        && run.output.contains("rip=0x000000000000fff0");
    (run.status != 0 && reset_vector_fault)
        .then_some("the nested guest triple-faulted at the reset vector")
}

fn run_once(name: &str, script: &str, opts: &LabOptions) -> LabOutcome {
    let dir = tempfile::tempdir().expect("temporary directory for the scenario script");
    let path = dir.path().join(format!("{name}.sh"));
    std::fs::write(&path, script).expect("write the scenario script");

    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("images/lab/run-scenario.sh"))
        .arg(&path)
        .arg("--no-build")
        .arg("--timeout")
        .arg(opts.timeout.as_secs().max(1).to_string());
    if opts.xfs {
        cmd.arg("--xfs");
    }
    if opts.iommu {
        cmd.arg("--iommu");
    }
    if opts.peer {
        cmd.arg("--peer");
    }
    for f in &opts.files {
        cmd.arg("--file").arg(f);
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run images/lab/run-scenario.sh: {e}"));
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Shown by libtest when the test fails (or with --nocapture).
    print!("{stderr}{stdout}");
    println!("lab: scenario {name} took {:.1}s", elapsed.as_secs_f64());

    let status = out.status.code().unwrap_or(-1);
    let output = between_markers(&stdout, name).unwrap_or_default();
    let log_path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("lab console log: "))
        .map(PathBuf::from)
        .unwrap_or_default();
    LabOutcome {
        status,
        output,
        log_path,
        elapsed,
    }
}

/// The scenario's output: the lines between `===== BEGIN scenario NAME =====` and the `===== END scenario` line.
fn between_markers(stdout: &str, name: &str) -> Option<String> {
    let begin = format!("===== BEGIN scenario {name} =====");
    let mut lines = stdout.lines().skip_while(|l| *l != begin);
    lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|l| !l.starts_with("===== END scenario "))
        .collect();
    Some(body.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_taken_between_the_markers() {
        let stdout = "noise\n===== BEGIN scenario s =====\none\ntwo\n===== END scenario s: status 0 (3s) =====\n\
                      lab console log: /x/console.log\n";
        assert_eq!(between_markers(stdout, "s").as_deref(), Some("one\ntwo\n"));
        assert_eq!(between_markers(stdout, "other"), None);
    }

    #[test]
    fn only_the_labs_own_failures_are_run_again() {
        let run = |status: i32, output: &str| LabOutcome {
            status,
            output: output.to_owned(),
            log_path: PathBuf::new(),
            elapsed: Duration::ZERO,
        };
        let reset =
            "daxvisor: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)\nrip=0x000000000000fff0 rsp=0x0\n";
        assert!(lab_flake(&run(124, "")).is_some());
        assert!(lab_flake(&run(1, reset)).is_some());
        // A triple fault anywhere else is the guest's or daxvisor's, and a passing run is never repeated.
        assert!(lab_flake(&run(
            1,
            "triple fault (KVM_EXIT_SHUTDOWN)\nrip=0xffffffff81000000"
        ))
        .is_none());
        assert!(lab_flake(&run(0, reset)).is_none());
        assert!(lab_flake(&run(1, "assertion failed")).is_none());
    }
}
