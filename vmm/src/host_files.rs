//! The host files a VM start touches besides its pmem backings (kernel, initrd, serial output), and the undo
//! list that makes a refused start leave the host as it found it.
//!
//! Inputs are checked by type before they are opened: a FIFO, socket or device named as a kernel or initrd
//! would block the open or the read forever, so only regular files are opened, and the open is `O_NONBLOCK`
//! in case the path was swapped for something else in between (the type is checked again on the descriptor).
//! Kernels are classified from a bounded read of their head, never read whole first.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors about a host file the operator named; each says which option named it.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("{what} {path}: is a {kind}; only a regular file can be used here (it would block the start)")]
    Special {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {path}: the directory {parent} does not exist; create it first")]
    MissingParent {
        what: &'static str,
        path: PathBuf,
        parent: PathBuf,
    },
    #[error("{what} {path}: the file system is read-only (EROFS); name a file on a writable file system")]
    ReadOnlyFs { what: &'static str, path: PathBuf },
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}: larger than {limit} bytes ({len} bytes); not a kernel this VMM loads")]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        len: u64,
        limit: u64,
    },
}

/// A name for what a file type is, when it is not a regular file.
fn special_kind(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("directory")
    } else if t.is_fifo() {
        Some("FIFO")
    } else if t.is_socket() {
        Some("socket")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_block_device() {
        Some("block device")
    } else {
        Some("special file")
    }
}

/// Open a regular file for reading: refused by type before the open, opened non-blocking, checked again.
pub fn open_regular(path: &Path, what: &'static str) -> Result<File, HostFileError> {
    let open_err = |source| HostFileError::Open {
        what,
        path: path.to_owned(),
        source,
    };
    let special = |kind| HostFileError::Special {
        what,
        path: path.to_owned(),
        kind,
    };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    if let Some(kind) = special_kind(meta.file_type()) {
        return Err(special(kind));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if let Some(kind) = special_kind(meta.file_type()) {
        return Err(special(kind));
    }
    Ok(file)
}

/// Read at most `limit` bytes from the start of `file`.
pub fn read_head(file: &mut File, limit: u64) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    file.by_ref().take(limit).read_to_end(&mut head)?;
    Ok(head)
}

/// Read a whole regular file, refusing one larger than `limit` before reading it.
pub fn read_bounded(
    file: &mut File,
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, HostFileError> {
    let open_err = |source| HostFileError::Open {
        what,
        path: path.to_owned(),
        source,
    };
    let len = file.metadata().map_err(open_err)?.len();
    if len > limit {
        return Err(HostFileError::TooLarge {
            what,
            path: path.to_owned(),
            len,
            limit,
        });
    }
    read_head(file, limit).map_err(open_err)
}

/// One thing to put back if the start fails.
enum UndoStep {
    /// The start created this file.
    Remove(PathBuf),
    /// The start lengthened this file (appended to it or extended it); give it its old length back.
    Truncate { file: File, path: PathBuf, len: u64 },
}

/// What a start has changed on the host so far. Dropped while armed (any `?` before the guest runs), it puts
/// everything back, newest first; [`StartUndo::commit`] disarms it once the VM runs.
#[derive(Default)]
pub struct StartUndo {
    steps: Vec<UndoStep>,
    committed: bool,
}

impl StartUndo {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remove `path` if the start fails.
    pub fn remove_on_failure(&mut self, path: &Path) {
        self.steps.push(UndoStep::Remove(path.to_owned()));
    }

    /// Cut `file` back to `len` bytes if the start fails.
    pub fn truncate_on_failure(&mut self, file: File, path: &Path, len: u64) {
        self.steps.push(UndoStep::Truncate {
            file,
            path: path.to_owned(),
            len,
        });
    }

    /// The VM runs: keep everything.
    pub fn commit(&mut self) {
        self.committed = true;
        self.steps.clear();
    }
}

impl Drop for StartUndo {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        while let Some(step) = self.steps.pop() {
            match step {
                UndoStep::Remove(path) => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), "failed start: cannot remove the file it created: {e}");
                    }
                }
                UndoStep::Truncate { file, path, len } => {
                    if let Err(e) = file.set_len(len) {
                        tracing::warn!(path = %path.display(), "failed start: cannot restore the file's length: {e}");
                    }
                }
            }
        }
    }
}

/// Map an error creating or opening a file for writing to one that names the cause and the remedy.
pub fn write_open_error(what: &'static str, path: &Path, source: io::Error) -> HostFileError {
    match source.raw_os_error() {
        Some(libc::EROFS) => HostFileError::ReadOnlyFs {
            what,
            path: path.to_owned(),
        },
        Some(libc::ENOENT) => match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) if !parent.exists() => HostFileError::MissingParent {
                what,
                path: path.to_owned(),
                parent: parent.to_owned(),
            },
            _ => HostFileError::Open {
                what,
                path: path.to_owned(),
                source,
            },
        },
        _ => HostFileError::Open {
            what,
            path: path.to_owned(),
            source,
        },
    }
}

/// Where a `--serial` or `--console` output (`what`) goes, opened; a file is opened by [`open_output_file`].
pub fn open_output(
    output: &crate::config::SerialOutput,
    what: &'static str,
    undo: &mut StartUndo,
) -> Result<Box<dyn std::io::Write + Send>, HostFileError> {
    use crate::config::SerialOutput;
    Ok(match output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(open_output_file(path, what, undo)?),
    })
}

/// Open (or create) an output file (`--serial`, `--console`: `what`) for appending, recording in `undo` how to
/// put it back. FIFOs, sockets and directories are refused before the open; character devices (a terminal,
/// `/dev/null`) are fine.
pub fn open_output_file(
    path: &Path,
    what: &'static str,
    undo: &mut StartUndo,
) -> Result<File, HostFileError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let t = meta.file_type();
            if !t.is_char_device() {
                if let Some(kind) = special_kind(t) {
                    return Err(HostFileError::Special {
                        what,
                        path: path.to_owned(),
                        kind,
                    });
                }
            }
            let file = OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
                .open(path)
                .map_err(|e| write_open_error(what, path, e))?;
            if t.is_file() {
                let restore = file
                    .try_clone()
                    .map_err(|e| write_open_error(what, path, e))?;
                undo.truncate_on_failure(restore, path, meta.len());
            }
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o640)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| write_open_error(what, path, e))?;
            undo.remove_on_failure(path);
            Ok(file)
        }
        Err(e) => Err(write_open_error(what, path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let e = open_regular(&fifo, "--kernel").unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = open_regular(dir.path(), "--initrd").unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let e = open_regular(Path::new("/dev/zero"), "--kernel").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let mut undo = StartUndo::new();
        let e = open_output_file(&fifo, "--serial", &mut undo).unwrap_err();
        assert!(e.to_string().contains("--serial") && e.to_string().contains("FIFO"));
        assert!(open_output_file(Path::new("/dev/null"), "--serial", &mut undo).is_ok());
    }

    #[test]
    fn bounded_reads_stop_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let mut f = open_regular(&p, "--kernel").unwrap();
        assert_eq!(read_head(&mut f, 4096).unwrap().len(), 4096);
        let mut f = open_regular(&p, "--kernel").unwrap();
        let e = read_bounded(&mut f, &p, "--kernel", 9_999).unwrap_err();
        assert!(e.to_string().contains("10000 bytes"), "{e}");
    }

    #[test]
    fn a_failed_start_removes_and_restores_serial_files() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.log");
        let old = dir.path().join("old.log");
        std::fs::write(&old, b"earlier run\n").unwrap();
        {
            let mut undo = StartUndo::new();
            open_output_file(&new, "--serial", &mut undo)
                .unwrap()
                .write_all(b"x")
                .unwrap();
            open_output_file(&old, "--console", &mut undo)
                .unwrap()
                .write_all(b"boot text\n")
                .unwrap();
        }
        assert!(!new.exists());
        assert_eq!(std::fs::read(&old).unwrap(), b"earlier run\n");
        {
            let mut undo = StartUndo::new();
            open_output_file(&new, "--serial", &mut undo).unwrap();
            undo.commit();
        }
        assert!(new.exists());
        let e = open_output_file(
            &dir.path().join("no/such/dir/log"),
            "--serial",
            &mut StartUndo::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
