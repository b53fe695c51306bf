//! Where a host's VMs keep their API sockets: `daxvisor run --name NAME` serves on `DIR/NAME.sock`, and
//! `daxvisor-ctl --name NAME` and `daxvisor-ctl list` find them there.
//!
//! DIR is `$DAXVISOR_SOCKET_DIR` when set, else `/run/daxvisor` for root, else `$XDG_RUNTIME_DIR/daxvisor`,
//! else `/tmp/daxvisor-UID`. daxvisor creates it with mode 0700 (only its owner can reach the sockets in it).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Overrides the socket directory.
pub const DIR_ENV: &str = "DAXVISOR_SOCKET_DIR";
/// Selects one VM's socket for `daxvisor-ctl` (as `--api-socket` does).
pub const SOCKET_ENV: &str = "DAXVISOR_API_SOCKET";
/// The suffix of an API socket in the directory.
const SUFFIX: &str = ".sock";

#[derive(Debug, thiserror::Error)]
pub enum SocketDirError {
    #[error("--name {0:?}: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.' or '-')")]
    BadName(String),
    #[error("no such directory {0} (no VM has been started with --name here, or {DIR_ENV} points elsewhere)")]
    NoDirectory(PathBuf),
    #[error("no VM named {name} in {dir}{}", known_list(.known))]
    NoVm {
        name: String,
        dir: PathBuf,
        known: Vec<String>,
    },
    #[error("{0} is not a socket")]
    NotASocket(PathBuf),
    #[error("socket directory {dir}: {op}: {source}")]
    Io {
        dir: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        " (no VMs there)".to_owned()
    } else {
        format!(" (VMs there: {})", known.join(", "))
    }
}

/// The socket directory of this host for this user.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/daxvisor");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("daxvisor"),
        None => PathBuf::from(format!("/tmp/daxvisor-{uid}")),
    }
}

/// A VM name is a file name in the directory: no separators, no hidden files, nothing a shell mangles.
pub fn check_name(name: &str) -> Result<(), SocketDirError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SocketDirError::BadName(name.to_owned()))
    }
}

/// The socket `daxvisor run --name NAME` serves on, with its directory created (mode 0700) if missing.
pub fn socket_for_run(name: &str) -> Result<PathBuf, SocketDirError> {
    check_name(name)?;
    let dir = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| SocketDirError::Io {
            dir: dir.clone(),
            op: "create",
            source,
        })?;
    Ok(dir.join(format!("{name}{SUFFIX}")))
}

/// The socket of the VM named `name`, which must exist and be a socket.
pub fn socket_of(name: &str) -> Result<PathBuf, SocketDirError> {
    check_name(name)?;
    let dir = dir();
    let path = dir.join(format!("{name}{SUFFIX}"));
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => Ok(path),
        Ok(_) => Err(SocketDirError::NotASocket(path)),
        Err(_) if !dir.is_dir() => Err(SocketDirError::NoDirectory(dir)),
        Err(_) => Err(SocketDirError::NoVm {
            name: name.to_owned(),
            known: list(&dir)?.into_iter().map(|(n, _)| n).collect(),
            dir,
        }),
    }
}

/// Check a socket path given outright (`--api-socket`, `DAXVISOR_API_SOCKET`).
pub fn check_socket(path: &Path) -> Result<(), SocketDirError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(SocketDirError::NotASocket(path.to_owned())),
        Err(_) => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => {
                Err(SocketDirError::NoDirectory(p.to_owned()))
            }
            // Missing socket in an existing directory: connecting says so with the path.
            _ => Ok(()),
        },
    }
}

/// Every VM socket in `dir`, by name, sorted. Files that are not sockets are left out.
pub fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, SocketDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            SocketDirError::NoDirectory(dir.to_owned())
        } else {
            SocketDirError::Io {
                dir: dir.to_owned(),
                op: "read",
                source,
            }
        }
    })?;
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(SUFFIX)?.to_owned();
            check_name(&name).ok()?;
            Some((name, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The VM's name when its socket sits in a socket directory as `NAME.sock` (the metrics' `vm` label for a VM
/// started with `--api-socket` instead of `--name`).
pub fn name_of_socket(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(SUFFIX)?;
    check_name(name).ok().map(|()| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn names_are_plain_file_names() {
        for good in ["vm1", "db-primary", "a.b_c"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_directory_lists_its_sockets_by_name_and_skips_other_files() {
        let d = tempfile::tempdir().unwrap();
        let _a = UnixListener::bind(d.path().join("b.sock")).unwrap();
        let _b = UnixListener::bind(d.path().join("a.sock")).unwrap();
        std::fs::write(d.path().join("c.sock"), "").unwrap();
        std::fs::write(d.path().join("notes"), "").unwrap();
        let names: Vec<String> = list(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            list(&d.path().join("missing")),
            Err(SocketDirError::NoDirectory(_))
        ));
        assert!(matches!(
            check_socket(&d.path().join("c.sock")),
            Err(SocketDirError::NotASocket(_))
        ));
        assert!(check_socket(&d.path().join("a.sock")).is_ok());
        assert!(matches!(
            check_socket(&d.path().join("nodir/x.sock")),
            Err(SocketDirError::NoDirectory(_))
        ));
        assert_eq!(
            name_of_socket(&d.path().join("a.sock")).as_deref(),
            Some("a")
        );
    }
}
