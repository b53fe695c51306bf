//! Thin pmem: giving a pmem filesystem's free space back to the host.
//!
//! For each filesystem on a pmem block device: learn its region from the host (`ListRegions`; device-DAX
//! backings cannot be punched, so such a filesystem is not frozen), freeze it, read its free extents
//! (GETFSMAP), turn them into region ranges aligned inward to what the host can punch, offer each range
//! (`OfferReclaim`, one at a time, each within the time left), then close the owner the offers were made under
//! (the host drops whatever it did not punch, so nothing can be punched after the thaw) and thaw — always.
//!
//! Freezing is what makes the offer safe: no block can be allocated between the reading of the free space and
//! the punch. The host answers an offer to a region under policy `auto` once the range is punched (or refused);
//! under `manual` it lists the offer and answers at once: the operator's later punch finds the offer gone.

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daxvisor_proto::agent::{
    self, errno, region_kind, Message, OpenOwner, RangeRequest, RegionInfo,
};
use serde::{Deserialize, Serialize};

use crate::freeze::{self, FreezeError};
use crate::fsmap::{self, Extent, FsmapError};
use crate::port::{Port, PortError, Reply};

/// How long the closing of the offers' owner may take while frozen. A working host answers within its punch
/// deadline (5 s): it drops the owner's offers at once and waits only for a punch already under way. The bound is
/// well above that, so the thaw that follows a timeout happens only when the host does not serve the agent channel
/// at all (a hung VMM: docs/agent-protocol.md says what is then at stake).
const CLOSE_BOUND: Duration = Duration::from_secs(12);

/// What the host can punch in a region of this kind: 2 MiB for RAM backings (hugetlbfs punches whole huge
/// pages), a 4 KiB page elsewhere.
pub fn punch_granule(kind: u32) -> u64 {
    if kind == region_kind::RAM {
        2 << 20
    } else {
        4096
    }
}

/// One range to offer, region-relative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// The device's free extents as region ranges: the device's byte 0 is the region's byte `base`; each range is
/// aligned inward to `granule` (a power of two), clipped to the region's `size`, and kept when at least
/// `min_size` (and at least one granule) long.
pub fn device_ranges(
    free: &[Extent],
    base: u64,
    size: u64,
    granule: u64,
    min_size: u64,
) -> Vec<Range> {
    let granule = granule.max(1);
    let min = min_size.max(granule);
    free.iter()
        .filter_map(|e| {
            let start = base.checked_add(e.start)?;
            let end = start.checked_add(e.len)?.min(size);
            let start = start.checked_next_multiple_of(granule)?;
            let end = end - end % granule;
            (end > start && end - start >= min).then(|| Range {
                offset: start,
                len: end - start,
            })
        })
        .collect()
}

/// What one run asks for.
#[derive(Clone, Debug)]
pub struct Options {
    /// One mount; `None` = every filesystem on a pmem device.
    pub mount: Option<PathBuf>,
    /// Free ranges shorter than this are not offered.
    pub min_size: u64,
    /// The bound on the host's answers while frozen; past it the run stops offering, closes and thaws.
    pub timeout: Duration,
}

/// What one filesystem's reclaim came to.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    pub mount: String,
    pub device: String,
    /// The region id, when found.
    pub region: Option<u64>,
    /// Free bytes GETFSMAP listed.
    pub free_bytes: u64,
    /// Ranges and bytes offered.
    pub ranges_offered: u64,
    pub bytes_offered: u64,
    /// Bytes the host confirmed (punched under `auto`, listed under `manual`).
    pub bytes_accepted: u64,
    /// How long the filesystem was frozen, in microseconds (0 when it was not).
    pub frozen_us: u64,
    /// Why nothing (or not everything) was offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a filesystem's reclaim failed.
#[derive(Debug, thiserror::Error)]
pub enum ThinError {
    #[error("{0}")]
    Freeze(#[from] FreezeError),
    #[error("{0}")]
    Fsmap(#[from] FsmapError),
    #[error("{0}")]
    Port(#[from] PortError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0} is not on a pmem block device")]
    NotPmem(String),
    #[error("no region of this VM holds {0}")]
    NoRegion(String),
    #[error("region {0} is backed by host device-DAX, which cannot be punched: not frozen")]
    DeviceDax(u64),
    #[error("region {0} is read-only")]
    ReadOnly(u64),
    #[error("no answer from the host within {0:?}: offering stopped")]
    Timeout(Duration),
}

/// A filesystem on a pmem block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmemMount {
    pub mount: PathBuf,
    /// `st_dev` of the filesystem.
    pub dev: u64,
    /// e.g. `pmem0`.
    pub device: String,
    /// Guest-physical address of the device's byte 0.
    pub phys: u64,
}

/// The filesystems on pmem block devices (from /proc/self/mountinfo and sysfs); `only` picks one mount.
pub fn pmem_mounts(only: Option<&Path>) -> Result<Vec<PmemMount>, ThinError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    let want = only.map(std::fs::canonicalize).transpose()?;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(majmin), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        if want.as_ref().is_some_and(|w| *w != point) {
            continue;
        }
        if out.iter().any(|m: &PmemMount| m.mount == point) {
            continue;
        }
        let Some(dev) = pmem_device(majmin) else {
            if want.is_some() {
                return Err(ThinError::NotPmem(point.display().to_string()));
            }
            continue;
        };
        let st = std::fs::metadata(&point)?;
        out.push(PmemMount {
            mount: point,
            dev: st.dev(),
            device: dev.0,
            phys: dev.1,
        });
    }
    if let (Some(w), true) = (&want, out.is_empty()) {
        return Err(ThinError::NotPmem(w.display().to_string()));
    }
    Ok(out)
}

/// mountinfo escapes spaces and friends as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match (b[i], oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `MAJ:MIN` of a pmem block device (or a partition of one): its name and the guest-physical address of its
/// byte 0 (the nd namespace's `resource`, plus the partition's start).
fn pmem_device(majmin: &str) -> Option<(String, u64)> {
    let sys = PathBuf::from(format!("/sys/dev/block/{majmin}"));
    let name = std::fs::read_link(&sys)
        .ok()?
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if !name.starts_with("pmem") {
        return None;
    }
    let (disk, start) = if sys.join("partition").exists() {
        let sectors: u64 = std::fs::read_to_string(sys.join("start"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (sys.join(".."), sectors * 512)
    } else {
        (sys.clone(), 0)
    };
    let res = std::fs::read_to_string(disk.join("device/resource")).ok()?;
    let phys = u64::from_str_radix(res.trim().trim_start_matches("0x"), 16).ok()?;
    Some((name, phys + start))
}

/// The region holding the device whose byte 0 is at guest-physical `phys`, and that byte's region offset.
pub fn region_of(regions: &[RegionInfo], phys: u64) -> Option<(&RegionInfo, u64)> {
    regions
        .iter()
        .find(|r| r.guest_addr <= phys && phys < r.guest_addr.saturating_add(r.size))
        .map(|r| (r, phys - r.guest_addr))
}

/// Reclaims the free space of every chosen filesystem; one report each.
pub fn run(port: &Port, opts: &Options) -> Result<Vec<Report>, ThinError> {
    let mounts = pmem_mounts(opts.mount.as_deref())?;
    let regions = match port.call_timeout(&Message::ListRegions, opts.timeout)? {
        Reply::Regions(r) => r,
        r => return Err(PortError::Unexpected(r).into()),
    };
    Ok(mounts
        .iter()
        .map(|m| {
            let mut report = Report {
                mount: m.mount.display().to_string(),
                device: m.device.clone(),
                ..Report::default()
            };
            if let Err(e) = reclaim_one(port, &regions, m, opts, &mut report) {
                eprintln!("daxvisor-agent: reclaim of {}: {e}", report.mount);
                report.error = Some(e.to_string());
            }
            report
        })
        .collect())
}

fn reclaim_one(
    port: &Port,
    regions: &[RegionInfo],
    m: &PmemMount,
    opts: &Options,
    report: &mut Report,
) -> Result<(), ThinError> {
    let (region, base) = region_of(regions, m.phys)
        .ok_or_else(|| ThinError::NoRegion(m.mount.display().to_string()))?;
    report.region = Some(region.region);
    if region.kind == region_kind::DEV_DAX {
        return Err(ThinError::DeviceDax(region.region));
    }
    if region.flags & agent::region_flags::READONLY != 0 {
        return Err(ThinError::ReadOnly(region.region));
    }
    // A filesystem without GETFSMAP is not frozen for nothing.
    fsmap::free_extents(std::fs::File::open(&m.mount)?.as_fd(), m.dev)?;
    let owner = match port.call_timeout(
        &Message::OpenOwner(OpenOwner {
            name: agent::name_field("reclaim"),
        }),
        opts.timeout,
    )? {
        Reply::Owner(o) => o,
        r => return Err(PortError::Unexpected(r).into()),
    };
    let frozen_at = Instant::now();
    let frozen = match freeze::freeze(&m.mount) {
        Ok(f) => f,
        Err(e) => {
            let _ = port.call_timeout(&Message::CloseOwner { owner }, CLOSE_BOUND);
            return Err(e.into());
        }
    };
    let offered = offer_free_space(port, &frozen, region, base, owner, m, opts, report);
    // Whatever the host did not punch goes with the owner, before the filesystem can allocate again (a refusal
    // here means the session is gone, and its offers with it).
    let closed = port.call_timeout(&Message::CloseOwner { owner }, CLOSE_BOUND);
    let thawed = frozen.thaw();
    report.frozen_us = u64::try_from(frozen_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    offered?;
    closed?;
    thawed?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn offer_free_space(
    port: &Port,
    frozen: &freeze::Frozen,
    region: &RegionInfo,
    base: u64,
    owner: u64,
    m: &PmemMount,
    opts: &Options,
    report: &mut Report,
) -> Result<(), ThinError> {
    let deadline = Instant::now() + opts.timeout;
    let free = fsmap::free_extents(frozen.dir().as_fd(), m.dev)?;
    report.free_bytes = free.iter().map(|e| e.len).sum();
    let ranges = device_ranges(
        &free,
        base,
        region.size,
        punch_granule(region.kind),
        opts.min_size,
    );
    for r in ranges {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ThinError::Timeout(opts.timeout));
        }
        report.ranges_offered += 1;
        report.bytes_offered += r.len;
        let msg = Message::OfferReclaim(RangeRequest {
            owner,
            region: region.region,
            offset: r.offset,
            len: r.len,
        });
        match port.call_timeout(&msg, left) {
            Ok(_) => report.bytes_accepted += r.len,
            // The host refused this range (a hold of another owner over it, a full queue): the others may
            // still go.
            Err(PortError::Refused(no, _)) => eprintln!(
                "daxvisor-agent: offer of region {} [{:#x}, +{:#x}) refused: {}",
                region.region,
                r.offset,
                r.len,
                errno::name(no)
            ),
            Err(PortError::Timeout(_)) => return Err(ThinError::Timeout(opts.timeout)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One line for people: what a filesystem's reclaim came to.
pub fn summary(r: &Report) -> String {
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let mut s = format!(
        "{} ({}): {:.1} MiB free, {} range(s) {:.1} MiB offered, {:.1} MiB accepted, frozen {:.3} s",
        r.mount,
        r.device,
        mib(r.free_bytes),
        r.ranges_offered,
        mib(r.bytes_offered),
        mib(r.bytes_accepted),
        r.frozen_us as f64 / 1e6
    );
    if r.frozen_us > 0 {
        s += &format!(
            ", {:.1} MiB/s",
            mib(r.bytes_accepted) / (r.frozen_us as f64 / 1e6)
        );
    }
    if let Some(e) = &r.error {
        s += &format!("; {e}");
    }
    s
}

/// Parses a size: a number with an optional K, M, G or T suffix (powers of 1024; `KiB`, `MB` and the like
/// read the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("not a size: {s:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// Parses a duration: a number with an optional s, m, h or d suffix (seconds by default); `0` or `off` is none.
pub fn parse_every(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => return Err(format!("not a duration: {s:?}")),
    };
    Ok((secs > 0).then(|| Duration::from_secs(secs)))
}

#[cfg(test)]
#[path = "thin_test.rs"]
mod tests;
