//! DMA pinnability (DESIGN.md, "DMA pinnability"): whether the running kernel lets a DMA mapper (VFIO type1,
//! iommufd) pin a region's pages long-term, decided from the backing kind, how the VMM mapped it and the kernel
//! version. The kernel's long-term pinning (FOLL_LONGTERM) refuses FS-DAX pages in any mapping (EOPNOTSUPP), and
//! since Linux 6.5 refuses writable shared mappings of page-cache files (EFAULT); device-DAX, memfd/shmem,
//! hugetlbfs and anonymous memory (including private copies of non-DAX files) pin. A DMA pin on a region the
//! kernel will refuse fails up front with the rule; where the kernel answers otherwise, its answer is recorded on
//! the region and wins.

use std::fmt;

use crate::host::BackingKind;

/// The backings every kernel lets a DMA mapper pin, for error messages.
pub const PINNABLE_BACKINGS: &str =
    "device-DAX, memfd/shmem, hugetlbfs, anonymous memory, private (copy-on-write) mappings of non-DAX files";

/// A kernel release as `uname -r` gives it, major.minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    /// e.g. 6
    pub major: u32,
    /// e.g. 1
    pub minor: u32,
}

impl KernelVersion {
    /// The first kernel that refuses long-term pins of writable shared page-cache mappings.
    pub const SHARED_FILE_REFUSED: KernelVersion = KernelVersion { major: 6, minor: 5 };

    /// Parses the leading `MAJOR.MINOR` of a release string such as `6.1.0-48-amd64`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(KernelVersion { major, minor })
    }

    /// The running kernel (uname, asked once: regions added later run under seccomp filters without it);
    /// None when its release string cannot be read.
    pub fn running() -> Option<Self> {
        static RUNNING: std::sync::OnceLock<Option<KernelVersion>> = std::sync::OnceLock::new();
        *RUNNING.get_or_init(Self::uname)
    }

    fn uname() -> Option<Self> {
        // SAFETY: utsname is plain data; uname only writes into it.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: a valid out-pointer.
        if unsafe { libc::uname(&mut u) } != 0 {
            return None;
        }
        let bytes: Vec<u8> = u
            .release
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        Self::parse(&String::from_utf8_lossy(&bytes))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The rule that decides a region's DMA pinnability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaRule {
    /// Device-DAX: ZONE_DEVICE pages without a filesystem; pinnable.
    DeviceDax,
    /// memfd, shmem/tmpfs or hugetlbfs: RAM pages; pinnable.
    RamBacked,
    /// A private mapping of a non-DAX file: written pages are anonymous copies; pinnable.
    PrivateCopy,
    /// FS-DAX, in any mapping: refused (EOPNOTSUPP).
    FsDax,
    /// A writable shared page-cache file on Linux >= 6.5: refused (EFAULT).
    SharedFileWritable,
    /// A writable shared page-cache file before Linux 6.5: pinnable.
    SharedFileWritableOldKernel,
    /// The kernel refused a pin the rules allowed, with this errno: its answer wins from then on.
    KernelRefused(i32),
}

impl DmaRule {
    /// Whether the kernel pins regions under this rule.
    pub fn pinnable(self) -> bool {
        matches!(
            self,
            DmaRule::DeviceDax
                | DmaRule::RamBacked
                | DmaRule::PrivateCopy
                | DmaRule::SharedFileWritableOldKernel
        )
    }

    /// A short stable name (introspection, logs, docs).
    pub fn name(self) -> &'static str {
        match self {
            DmaRule::DeviceDax => "devdax",
            DmaRule::RamBacked => "ram-backed",
            DmaRule::PrivateCopy => "private-copy",
            DmaRule::FsDax => "fsdax-never",
            DmaRule::SharedFileWritable => "shared-file-writable-since-6.5",
            DmaRule::SharedFileWritableOldKernel => "shared-file-writable-before-6.5",
            DmaRule::KernelRefused(_) => "kernel-refused",
        }
    }

    /// The errno the kernel gives (or gave) a long-term pin under this rule; 0 when it pins.
    pub fn kernel_errno(self) -> i32 {
        match self {
            DmaRule::FsDax => libc::EOPNOTSUPP,
            DmaRule::SharedFileWritable => libc::EFAULT,
            DmaRule::KernelRefused(e) => e,
            _ => 0,
        }
    }

    /// Classifies a region of backing `kind`, mapped `MAP_PRIVATE` or not, on `kernel`. None (release
    /// unreadable) counts as a current kernel: refusing up front is the safe answer for shared page-cache files.
    pub fn classify(kind: BackingKind, private: bool, kernel: Option<KernelVersion>) -> DmaRule {
        match kind {
            BackingKind::DevDax => DmaRule::DeviceDax,
            BackingKind::FsDax => DmaRule::FsDax,
            BackingKind::Ram => DmaRule::RamBacked,
            // Regular, and any kind added later: a page-cache file.
            _ if private => DmaRule::PrivateCopy,
            _ => match kernel {
                Some(k) if k < KernelVersion::SHARED_FILE_REFUSED => {
                    DmaRule::SharedFileWritableOldKernel
                }
                _ => DmaRule::SharedFileWritable,
            },
        }
    }
}

impl fmt::Display for DmaRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaRule::DeviceDax => f.write_str("device-DAX pages pin for DMA"),
            DmaRule::RamBacked => f.write_str("memfd/shmem/hugetlbfs pages pin for DMA"),
            DmaRule::PrivateCopy => {
                f.write_str("a private mapping of a non-DAX file pins its anonymous copies for DMA")
            }
            DmaRule::FsDax => f.write_str(
                "the kernel never pins FS-DAX file pages long-term, in any mapping (EOPNOTSUPP)",
            ),
            DmaRule::SharedFileWritable => f.write_str(
                "since Linux 6.5 the kernel refuses long-term pins of writable shared page-cache file mappings (EFAULT)",
            ),
            DmaRule::SharedFileWritableOldKernel => f.write_str(
                "before Linux 6.5 the kernel pins writable shared page-cache file mappings long-term",
            ),
            DmaRule::KernelRefused(e) => write!(
                f,
                "the kernel refused a DMA pin here ({}) although the rules allow it; its answer stands",
                std::io::Error::from_raw_os_error(*e)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        let k = |s| KernelVersion::parse(s);
        assert_eq!(
            k("6.1.0-48-amd64"),
            Some(KernelVersion { major: 6, minor: 1 })
        );
        assert_eq!(
            k("6.12.57+deb13-amd64"),
            Some(KernelVersion {
                major: 6,
                minor: 12
            })
        );
        assert_eq!(
            k("5.15"),
            Some(KernelVersion {
                major: 5,
                minor: 15
            })
        );
        assert_eq!(k("garbage"), None);
        assert_eq!(k("6"), None);
        assert!(k("6.4.9").unwrap() < KernelVersion::SHARED_FILE_REFUSED);
        assert!(k("6.10.1").unwrap() > KernelVersion::SHARED_FILE_REFUSED);
        assert!(
            KernelVersion::running().is_some(),
            "uname gives a parseable release here"
        );
    }

    #[test]
    fn classification_by_kind_mapping_and_kernel() {
        use BackingKind::*;
        let old = Some(KernelVersion { major: 6, minor: 1 });
        let new = Some(KernelVersion { major: 6, minor: 5 });
        for k in [old, new, None] {
            for private in [false, true] {
                assert_eq!(DmaRule::classify(FsDax, private, k), DmaRule::FsDax);
                assert_eq!(DmaRule::classify(DevDax, private, k), DmaRule::DeviceDax);
                assert_eq!(DmaRule::classify(Ram, private, k), DmaRule::RamBacked);
            }
            assert_eq!(DmaRule::classify(Regular, true, k), DmaRule::PrivateCopy);
        }
        assert_eq!(
            DmaRule::classify(Regular, false, old),
            DmaRule::SharedFileWritableOldKernel
        );
        assert_eq!(
            DmaRule::classify(Regular, false, new),
            DmaRule::SharedFileWritable
        );
        assert_eq!(
            DmaRule::classify(Regular, false, None),
            DmaRule::SharedFileWritable
        );
        assert!(!DmaRule::FsDax.pinnable() && !DmaRule::SharedFileWritable.pinnable());
        assert_eq!(DmaRule::FsDax.kernel_errno(), libc::EOPNOTSUPP);
        assert_eq!(DmaRule::SharedFileWritable.kernel_errno(), libc::EFAULT);
        assert!(DmaRule::PrivateCopy.pinnable() && DmaRule::SharedFileWritableOldKernel.pinnable());
    }
}
