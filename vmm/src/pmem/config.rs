//! `--pmem file=PATH[,size=SIZE][,readonly=on][,discard_writes=on][,id=NAME][,create=on][,prefault=on]
//! [,guard=deny|hold|log][,shared=on][,dma=off|agent|whole][,iommu=refuse|recall]`.
//!
//! Parsing only checks the syntax and combinations; the file itself is checked by [`super::backing`]. Paths
//! containing a comma are written with the comma doubled (`file=a,,b` is the file `a,b`), as QEMU does.

use std::path::PathBuf;
use std::str::FromStr;

use daxvisor_mapper::GuardPolicy;

use crate::layout::MIB;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmemConfig {
    pub file: PathBuf,
    /// Guest-visible size; `None` = the file's (or device's) size.
    pub size: Option<u64>,
    /// Read-only memslot, file opened read-only; guest writes are dropped and counted.
    pub readonly: bool,
    /// Private copy-on-write mapping: the guest may write, the file is never written.
    pub discard_writes: bool,
    /// Name in logs, metrics and the API; defaults to `pmemN`.
    pub id: Option<String>,
    /// Create the file if missing and extend it to `size` if shorter.
    pub create: bool,
    /// Populate the whole mapping before the guest starts (see [`super::prefault`]).
    pub prefault: bool,
    /// What the host guard does with a foreign open for writing of the file (default deny).
    pub guard: GuardPolicy,
    /// The file may be open for writing elsewhere at start (under `guard=deny` such a start is otherwise
    /// refused, naming the writer).
    pub shared: bool,
    /// What of the region a passthrough device (`--device vfio=`) may reach by DMA (default off).
    pub dma: DmaPolicy,
    /// Whether passthrough devices behind the virtual IOMMU (`--device ...,iommu=on`) may map it, and what a
    /// layout change over a mapped range does (default off: a MAP of it is refused).
    pub iommu: IommuPolicy,
}

/// `iommu=`: a region the guest's DMA API may map through the virtual IOMMU, and what happens when the operator
/// changes the layout of a range a device has mapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuPolicy {
    /// Not reachable through the virtual IOMMU: a MAP of it is refused (status RANGE).
    #[default]
    Off,
    /// Mappable; a change over a mapped range fails with ETXTBSY naming the endpoint.
    Refuse,
    /// Mappable; a change over a mapped range recalls it: the guest agent is told (device, range, deadline),
    /// and at the deadline the VMM fences (unmaps itself, reports a fault) and the change proceeds.
    Recall,
}

impl IommuPolicy {
    pub const ALL: [IommuPolicy; 3] = [IommuPolicy::Off, IommuPolicy::Refuse, IommuPolicy::Recall];

    pub fn as_str(self) -> &'static str {
        match self {
            IommuPolicy::Off => "off",
            IommuPolicy::Refuse => "refuse",
            IommuPolicy::Recall => "recall",
        }
    }
}

/// `dma=`: how a region is mapped for passthrough devices. Guest RAM is always mapped; pmem only through the
/// layout-lease manager's pins, so a range a device can reach is a pinned range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmaPolicy {
    /// Never mapped; a guest's DMA pin request on it is refused.
    #[default]
    Off,
    /// Nothing mapped until a guest agent pins a range with DMA; exactly that range is mapped, until unpin,
    /// revoke or the owner's end.
    Agent,
    /// Mapped whole at start, as one pin held by the device.
    Whole,
}

impl DmaPolicy {
    pub const ALL: [DmaPolicy; 3] = [DmaPolicy::Off, DmaPolicy::Agent, DmaPolicy::Whole];

    pub fn as_str(self) -> &'static str {
        match self {
            DmaPolicy::Off => "off",
            DmaPolicy::Agent => "agent",
            DmaPolicy::Whole => "whole",
        }
    }
}

impl std::fmt::Display for DmaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PmemConfigError {
    #[error("--pmem: missing file=PATH")]
    MissingFile,
    #[error(
        "--pmem: unknown key '{0}' (expected file, size, readonly, discard_writes, id, create, prefault, guard, shared, dma, iommu)"
    )]
    UnknownKey(String),
    #[error("--pmem: '{0}' needs a value ({0}=...)")]
    MissingValue(String),
    #[error("--pmem: key '{0}' given twice")]
    DuplicateKey(String),
    #[error("--pmem: {key}={value}: {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("--pmem: {0} and {1} cannot be combined ({2})")]
    Conflict(&'static str, &'static str, &'static str),
}

/// Split on single commas; a doubled comma is a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' && chars.peek() == Some(&',') {
            chars.next();
            cur.push(',');
        } else if c == ',' {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

fn parse_guard(value: &str) -> Result<GuardPolicy, PmemConfigError> {
    GuardPolicy::ALL
        .into_iter()
        .find(|p| p.as_str() == value)
        .ok_or_else(|| PmemConfigError::BadValue {
            key: "guard",
            value: value.to_owned(),
            expected: "expected deny (refuse foreign opens for writing), hold (whole-file break first, then allow unless pinned) or log",
        })
}

fn parse_dma(value: &str) -> Result<DmaPolicy, PmemConfigError> {
    DmaPolicy::ALL
        .into_iter()
        .find(|p| p.as_str() == value)
        .ok_or_else(|| PmemConfigError::BadValue {
            key: "dma",
            value: value.to_owned(),
            expected: "expected off (no device reaches it), agent (ranges a guest agent pins for DMA) or whole (mapped at start)",
        })
}

fn parse_iommu(value: &str) -> Result<IommuPolicy, PmemConfigError> {
    IommuPolicy::ALL
        .into_iter()
        .find(|p| p.as_str() == value)
        .ok_or_else(|| PmemConfigError::BadValue {
            key: "iommu",
            value: value.to_owned(),
            expected: "expected off (not mappable through the virtual IOMMU), refuse (changes over mapped ranges fail with ETXTBSY) or recall (the guest is asked to unmap; fenced at the deadline)",
        })
}

fn parse_bool(key: &'static str, value: &str) -> Result<bool, PmemConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(PmemConfigError::BadValue {
            key,
            value: value.to_owned(),
            expected: "expected on or off",
        }),
    }
}

/// Bytes, in the size syntax of every daxvisor command line (`daxvisor_proto::units`): `4096`, `512M`, `8G`,
/// `2MiB`, `0x200000`.
pub fn parse_size(value: &str) -> Result<u64, PmemConfigError> {
    daxvisor_proto::units::parse_size(value).map_err(|_| PmemConfigError::BadValue {
        key: "size",
        value: value.to_owned(),
        expected: daxvisor_proto::units::SIZE_SYNTAX,
    })
}

impl FromStr for PmemConfig {
    type Err = PmemConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut file = None;
        let mut size = None;
        let mut readonly = None;
        let mut discard_writes = None;
        let mut id = None;
        let mut create = None;
        let mut prefault = None;
        let mut guard = None;
        let mut shared = None;
        let mut dma = None;
        let mut iommu = None;

        fn set<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), PmemConfigError> {
            if slot.is_some() {
                return Err(PmemConfigError::DuplicateKey(key.to_owned()));
            }
            *slot = Some(v);
            Ok(())
        }

        for part in split_options(s) {
            if part.is_empty() {
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(match part.as_str() {
                    "file" | "size" | "readonly" | "discard_writes" | "id" | "create"
                    | "prefault" | "guard" | "shared" | "dma" | "iommu" => {
                        PmemConfigError::MissingValue(part)
                    }
                    _ => PmemConfigError::UnknownKey(part),
                });
            };
            match key {
                "file" => {
                    if value.is_empty() {
                        return Err(PmemConfigError::MissingValue("file".into()));
                    }
                    set(&mut file, key, PathBuf::from(value))?
                }
                "size" => set(&mut size, key, parse_size(value)?)?,
                "readonly" => set(&mut readonly, key, parse_bool("readonly", value)?)?,
                "discard_writes" => set(
                    &mut discard_writes,
                    key,
                    parse_bool("discard_writes", value)?,
                )?,
                "create" => set(&mut create, key, parse_bool("create", value)?)?,
                "prefault" => set(&mut prefault, key, parse_bool("prefault", value)?)?,
                "guard" => set(&mut guard, key, parse_guard(value)?)?,
                "shared" => set(&mut shared, key, parse_bool("shared", value)?)?,
                "dma" => set(&mut dma, key, parse_dma(value)?)?,
                "iommu" => set(&mut iommu, key, parse_iommu(value)?)?,
                "id" => {
                    let ok = !value.is_empty()
                        && value.len() <= 32
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !ok {
                        return Err(PmemConfigError::BadValue {
                            key: "id",
                            value: value.to_owned(),
                            expected: "expected 1-32 characters from A-Z a-z 0-9 - _",
                        });
                    }
                    set(&mut id, key, value.to_owned())?
                }
                _ => return Err(PmemConfigError::UnknownKey(key.to_owned())),
            }
        }

        let cfg = PmemConfig {
            file: file.ok_or(PmemConfigError::MissingFile)?,
            size,
            readonly: readonly.unwrap_or(false),
            discard_writes: discard_writes.unwrap_or(false),
            id,
            create: create.unwrap_or(false),
            prefault: prefault.unwrap_or(false),
            guard: guard.unwrap_or_default(),
            shared: shared.unwrap_or(false),
            dma: dma.unwrap_or_default(),
            iommu: iommu.unwrap_or_default(),
        };
        if cfg.readonly && cfg.discard_writes {
            return Err(PmemConfigError::Conflict(
                "readonly=on",
                "discard_writes=on",
                "a read-only region has no writes to discard",
            ));
        }
        if cfg.create && (cfg.readonly || cfg.discard_writes) {
            return Err(PmemConfigError::Conflict(
                "create=on",
                if cfg.readonly {
                    "readonly=on"
                } else {
                    "discard_writes=on"
                },
                "create=on writes the file, the other promises it is never written",
            ));
        }
        if cfg.create && cfg.size.is_none() {
            return Err(PmemConfigError::BadValue {
                key: "create",
                value: "on".into(),
                expected: "create=on needs size=SIZE",
            });
        }
        if cfg.readonly && cfg.dma != DmaPolicy::Off {
            return Err(PmemConfigError::Conflict(
                "readonly=on",
                if cfg.dma == DmaPolicy::Whole {
                    "dma=whole"
                } else {
                    "dma=agent"
                },
                "a device's DMA writes would bypass the read-only mapping",
            ));
        }
        if cfg.iommu != IommuPolicy::Off && cfg.dma != DmaPolicy::Off {
            return Err(PmemConfigError::Conflict(
                if cfg.iommu == IommuPolicy::Refuse {
                    "iommu=refuse"
                } else {
                    "iommu=recall"
                },
                if cfg.dma == DmaPolicy::Whole {
                    "dma=whole"
                } else {
                    "dma=agent"
                },
                "behind the virtual IOMMU the guest's own MAP requests decide what a device reaches",
            ));
        }
        if cfg.readonly && cfg.iommu != IommuPolicy::Off {
            return Err(PmemConfigError::Conflict(
                "readonly=on",
                "iommu=",
                "a device's DMA writes would bypass the read-only mapping",
            ));
        }
        if cfg.size == Some(0) {
            return Err(PmemConfigError::BadValue {
                key: "size",
                value: "0".into(),
                expected: "a pmem region cannot be empty",
            });
        }
        Ok(cfg)
    }
}

/// Guest windows are 2 MiB granular (see [`super::backing`] for why sizes are not padded).
pub const SIZE_ALIGN: u64 = 2 * MIB;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PmemConfig, PmemConfigError> {
        s.parse()
    }

    #[test]
    fn guard_policy_defaults_to_deny_and_lists_the_choices_when_wrong() {
        assert_eq!(p("file=x").unwrap().guard, GuardPolicy::Deny);
        for (v, want) in [
            ("deny", GuardPolicy::Deny),
            ("hold", GuardPolicy::Hold),
            ("log", GuardPolicy::Log),
        ] {
            assert_eq!(p(&format!("file=x,guard={v}")).unwrap().guard, want);
        }
        let e = p("file=x,guard=allow").unwrap_err().to_string();
        assert!(
            e.contains("guard=allow")
                && e.contains("deny")
                && e.contains("hold")
                && e.contains("log"),
            "{e}"
        );
        assert_eq!(
            p("file=x,guard"),
            Err(PmemConfigError::MissingValue("guard".into()))
        );
        assert_eq!(
            p("file=x,guard=log,guard=deny"),
            Err(PmemConfigError::DuplicateKey("guard".into()))
        );
    }

    #[test]
    fn full_and_minimal_forms() {
        let c = p("file=/data/vm1.img,size=8G,readonly=on,id=data_1").unwrap();
        assert_eq!(c.file, PathBuf::from("/data/vm1.img"));
        assert_eq!(c.size, Some(8 << 30));
        assert!(c.readonly && !c.discard_writes && !c.create);
        assert_eq!(c.id.as_deref(), Some("data_1"));
        let c = p("file=x").unwrap();
        assert_eq!((c.size, c.readonly, c.id), (None, false, None));
        let c = p("file=a,,b,discard_writes=on").unwrap();
        assert_eq!(c.file, PathBuf::from("a,b"));
        assert!(c.discard_writes);
        let c = p("file=n,size=4MiB,create=on").unwrap();
        assert_eq!(c.size, Some(4 << 20));
        assert!(c.create);
        assert!(!c.prefault, "prefault is off by default");
        let c = p("file=n,prefault=on,readonly=on").unwrap();
        assert!(c.prefault && c.readonly);
        assert!(p("file=n,prefault=sometimes").is_err());
    }

    #[test]
    fn iommu_defaults_to_off_lists_the_choices_and_excludes_dma_pins() {
        assert_eq!(p("file=x").unwrap().iommu, IommuPolicy::Off);
        assert_eq!(p("file=x,iommu=refuse").unwrap().iommu, IommuPolicy::Refuse);
        assert_eq!(p("file=x,iommu=recall").unwrap().iommu, IommuPolicy::Recall);
        let e = p("file=x,iommu=yes").unwrap_err().to_string();
        assert!(e.contains("refuse") && e.contains("recall"), "{e}");
        assert!(matches!(
            p("file=x,iommu=recall,dma=agent"),
            Err(PmemConfigError::Conflict("iommu=recall", "dma=agent", _))
        ));
        assert!(matches!(
            p("file=x,readonly=on,iommu=refuse"),
            Err(PmemConfigError::Conflict("readonly=on", "iommu=", _))
        ));
    }

    #[test]
    fn dma_defaults_to_off_and_lists_the_choices_when_wrong() {
        assert_eq!(p("file=x").unwrap().dma, DmaPolicy::Off);
        assert_eq!(p("file=x,dma=agent").unwrap().dma, DmaPolicy::Agent);
        assert_eq!(p("file=x,dma=whole").unwrap().dma, DmaPolicy::Whole);
        let e = p("file=x,dma=all").unwrap_err().to_string();
        assert!(
            e.contains("dma=all") && e.contains("agent") && e.contains("whole"),
            "{e}"
        );
        assert!(matches!(
            p("file=x,readonly=on,dma=whole"),
            Err(PmemConfigError::Conflict("readonly=on", "dma=whole", _))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err(), "overflow");
    }

    #[test]
    fn errors_name_the_bad_key() {
        assert_eq!(p("size=2M"), Err(PmemConfigError::MissingFile));
        assert_eq!(
            p("file=x,colour=red"),
            Err(PmemConfigError::UnknownKey("colour".into()))
        );
        assert_eq!(
            p("file=x,readonly"),
            Err(PmemConfigError::MissingValue("readonly".into()))
        );
        assert_eq!(
            p("file=x,file=y"),
            Err(PmemConfigError::DuplicateKey("file".into()))
        );
        let e = p("file=x,readonly=maybe").unwrap_err();
        assert!(e.to_string().contains("readonly=maybe"), "{e}");
        let e = p("file=x,size=0").unwrap_err();
        assert!(e.to_string().contains("size=0"), "{e}");
        let e = p("file=x,id=has space").unwrap_err();
        assert!(e.to_string().contains("id=has space"), "{e}");
        assert!(matches!(
            p("file=x,readonly=on,discard_writes=on"),
            Err(PmemConfigError::Conflict(..))
        ));
        assert!(matches!(
            p("file=x,size=2M,create=on,readonly=on"),
            Err(PmemConfigError::Conflict(..))
        ));
        let e = p("file=x,create=on").unwrap_err();
        assert!(e.to_string().contains("needs size"), "{e}");
        assert_eq!(
            p("file=,size=2M"),
            Err(PmemConfigError::MissingValue("file".into()))
        );
    }
}
