//! A backing file that lost its last name while the VM ran (`rm FILE`, or `mv other FILE`): the VMM's
//! descriptor still reaches the inode, and every byte the guest wrote is in it, but no name does, so the data
//! would go when the VMM closes it. The host guard logs the unlink when it happens; at stop, after the final
//! fdatasync, the data is copied through the VMM's descriptor to a recovery file beside the old name
//! (`NAME.recovered`, or `NAME.recovered.N` if that exists), which is fsynced with its directory, and the log
//! says where it is.
//!
//! Why a copy: linkat(2) of `/proc/self/fd/N` gives an inode a name again only if it was opened O_TMPFILE
//! (ENOENT otherwise). copy_file_range shares the blocks where the file system can (reflink on XFS and btrfs)
//! and copies them elsewhere; holes stay holes where the file system keeps them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How many `NAME.recovered.N` names are tried before giving up.
const NAMES: u32 = 100;

/// The recovery file's name for the `n`th try: `NAME.recovered`, then `NAME.recovered.1`, ...
pub fn recovery_path(old: &Path, n: u32) -> PathBuf {
    let mut name = old.file_name().unwrap_or_default().to_os_string();
    name.push(".recovered");
    if n > 0 {
        name.push(format!(".{n}"));
    }
    old.with_file_name(name)
}

/// If `file` has no name left, copies it to a recovery file beside `old` and returns that file's path and the
/// bytes copied; `Ok(None)` if the file still has a name.
pub fn recover_if_nameless(file: &File, old: &Path) -> io::Result<Option<(PathBuf, u64)>> {
    let meta = file.metadata()?;
    if meta.nlink() > 0 || !meta.file_type().is_file() {
        return Ok(None);
    }
    let (path, mut out) = create_beside(old)?;
    let len = meta.len();
    copy(file, &mut out, len)?;
    out.sync_all()?;
    let dir = old
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()?;
    Ok(Some((path, len)))
}

fn create_beside(old: &Path) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for n in 0..NAMES {
        let path = recovery_path(old, n);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no recovery name is free")))
}

/// `len` bytes from `from` to `to`, at the same offsets: copy_file_range, or pread/pwrite where the file
/// system does not offer it. Neither descriptor's file offset moves.
fn copy(from: &File, to: &mut File, len: u64) -> io::Result<()> {
    let mut off: u64 = 0;
    while off < len {
        let (mut a, mut b) = (off as libc::loff_t, off as libc::loff_t);
        let want = (len - off).min(1 << 30) as usize;
        // SAFETY: two open descriptors; the offsets are ours and the kernel advances them.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, want, 0)
        };
        match n {
            n if n > 0 => off += n as u64,
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ended early",
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        return copy_by_hand(from, to, off, len)
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

fn copy_by_hand(from: &File, to: &File, mut off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while off < len {
        let want = ((len - off) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ended early",
            ));
        }
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    to.set_len(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A real file, unlinked while open: its bytes land in `NAME.recovered`; a second time, in
    /// `NAME.recovered.1`; a file that still has a name is left alone.
    #[test]
    fn a_nameless_file_is_copied_beside_its_old_name() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("vm.img");
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&old)
            .unwrap();
        f.write_all(&data).unwrap();
        assert_eq!(recover_if_nameless(&f, &old).unwrap(), None);
        std::fs::remove_file(&old).unwrap();
        let (p, n) = recover_if_nameless(&f, &old).unwrap().unwrap();
        assert_eq!(
            (p.clone(), n),
            (dir.path().join("vm.img.recovered"), data.len() as u64)
        );
        assert_eq!(std::fs::read(&p).unwrap(), data);
        let (p2, _) = recover_if_nameless(&f, &old).unwrap().unwrap();
        assert_eq!(p2, dir.path().join("vm.img.recovered.1"));
        assert_eq!(std::fs::read(&p2).unwrap(), data);
    }
}
