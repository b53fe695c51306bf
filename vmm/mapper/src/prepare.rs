//! `prepare`: make a range pinnable without changing what it reads as. Holes and unwritten extents read as
//! zeros, so writing zeros there allocates written blocks with the same content; shared (reflinked) extents are
//! unshared (FALLOC_FL_UNSHARE_RANGE, or rewriting the same bytes where that is not supported); delalloc is
//! resolved by writeback. Dirty pages are written back first, so a page written through the mapping over an
//! unwritten extent is data, not a zero candidate. The caller needs an exclusive lease over the range (so no
//! layout change can run meanwhile) and the range is held by a transient pin while it works. Progress is
//! reported per chunk: gigabyte ranges take a while.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::error::{MapperError, Result};
use crate::host::{self, first_problem, fs_kind, ExtentFlags, ExtentProblem};
use crate::ids::{LeaseId, OwnerId, RegionId};
use crate::lease::LeaseMode;
use crate::Mapper;

/// How far a prepare has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareProgress {
    /// Bytes of the range handled so far.
    pub done: u64,
    /// Bytes in the range.
    pub total: u64,
}

/// What a prepare did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrepareReport {
    /// Bytes of holes and unwritten extents written with zeros.
    pub zeroed: u64,
    /// Bytes of shared extents unshared.
    pub unshared: u64,
}

const CHUNK: usize = 1 << 20;

impl Mapper {
    /// Makes `[off, off+len)` of `region` pinnable (`len == 0`: to the end of the window).
    pub fn prepare(
        &self,
        owner: OwnerId,
        region: RegionId,
        off: u64,
        len: u64,
        progress: &mut dyn FnMut(PrepareProgress),
    ) -> Result<PrepareReport> {
        let (file, file_range, _transient) = {
            let st = self.lock();
            st.check_owner(owner)?;
            let reg = st.region(region)?;
            reg.require_layout()?;
            let range = reg.request(off, len)?;
            let file_range = reg.to_file(range);
            let covered = st
                .holds(reg)?
                .leases
                .overlapping(file_range)
                .into_iter()
                .any(|id| {
                    st.leases.get(&LeaseId::from_raw(id)).is_some_and(|l| {
                        l.owner == owner
                            && l.mode == LeaseMode::Exclusive
                            && l.range.contains(&file_range)
                    })
                });
            if !covered {
                return Err(MapperError::NoExclusiveLease { owner, range });
            }
            let file = reg.desc.file.clone();
            drop(st);
            (file, file_range, self.transient(region, off, len)?)
        };
        let total = file_range.len();
        let mut report = PrepareReport::default();
        let (start, end) = (file_range.start, file_range.end);
        let fd = file.as_raw_fd();

        if fs_kind(file.as_ref())
            .map_err(|e| MapperError::io("fstatfs", e))?
            .is_ram()
        {
            // RAM filesystems have no extent map: allocating the pages is all there is.
            host::allocate(&file, start, total).map_err(|e| MapperError::io("fallocate", e))?;
            report.zeroed = total;
            progress(PrepareProgress { done: total, total });
            return Ok(report);
        }

        file.sync_data()
            .map_err(|e| MapperError::io("fdatasync", e))?;
        let mut pos = start;
        let mut synced_at = u64::MAX;
        while pos < end {
            let Some((at, len, problem)) =
                first_problem(fd, pos, end).map_err(|e| MapperError::io("FIEMAP", e))?
            else {
                break;
            };
            let bad_end = at + len;
            match problem {
                ExtentProblem::Hole => {
                    zero_fill(&file, at, bad_end, start, total, progress)?;
                    report.zeroed += len;
                }
                ExtentProblem::Flags(f) if f.contains(ExtentFlags::UNWRITTEN) => {
                    zero_fill(&file, at, bad_end, start, total, progress)?;
                    report.zeroed += len;
                }
                ExtentProblem::Flags(f) if f.contains(ExtentFlags::DELALLOC) && synced_at != at => {
                    // Writeback allocates it; look at the same offset again afterwards.
                    file.sync_data()
                        .map_err(|e| MapperError::io("fdatasync", e))?;
                    synced_at = at;
                    continue;
                }
                ExtentProblem::Flags(f) if f.contains(ExtentFlags::SHARED) => {
                    host::unshare(&file, at, bad_end).map_err(|e| MapperError::io("unshare", e))?;
                    report.unshared += len;
                }
                ExtentProblem::Flags(_) => {
                    return Err(MapperError::Unpinnable {
                        file_offset: at,
                        len,
                        problem,
                    });
                }
            }
            pos = bad_end;
            progress(PrepareProgress {
                done: pos - start,
                total,
            });
        }
        file.sync_data()
            .map_err(|e| MapperError::io("fdatasync", e))?;
        if let Some((file_offset, len, problem)) =
            first_problem(fd, start, end).map_err(|e| MapperError::io("FIEMAP", e))?
        {
            return Err(MapperError::Unpinnable {
                file_offset,
                len,
                problem,
            });
        }
        progress(PrepareProgress { done: total, total });
        tracing::info!(%owner, %region, range = %file_range, ?report, "range prepared for pinning");
        Ok(report)
    }
}

/// Writes zeros over `[from, to)`, which reads as zeros already (hole or unwritten).
fn zero_fill(
    file: &std::fs::File,
    from: u64,
    to: u64,
    start: u64,
    total: u64,
    progress: &mut dyn FnMut(PrepareProgress),
) -> Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut p = from;
    while p < to {
        let n = ((to - p) as usize).min(CHUNK);
        file.write_all_at(&zeros[..n], p)
            .map_err(|e| MapperError::io("pwrite zeros", e))?;
        p += n as u64;
        progress(PrepareProgress {
            done: p - start,
            total,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_files::TestRegion;
    #[allow(unused_imports)]
    use crate::*;

    #[test]
    fn prepare_makes_holes_unwritten_and_shared_pinnable_keeping_data() {
        for t in TestRegion::on_every_fs(64) {
            let m = &t.mapper;
            let a = m.add_owner("a");
            assert_eq!(
                m.prepare(a, t.region, 0, 0, &mut |_| {})
                    .unwrap_err()
                    .errno(),
                libc::EPERM
            );
            m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
            t.punch_raw(2 * t.page, 3 * t.page);
            t.punch_raw(8 * t.page, 2 * t.page);
            t.fallocate_raw(8 * t.page, 2 * t.page);
            let _clone = t.is_xfs().then(|| t.reflink_copy());
            if !t.ram_fs {
                assert_eq!(
                    m.pin(a, t.region, 0, 0).unwrap_err().errno(),
                    libc::EINVAL,
                    "{}",
                    t.fs
                );
            }
            let mut calls = Vec::new();
            let r = m
                .prepare(a, t.region, 0, 0, &mut |p| calls.push(p))
                .unwrap();
            let total = 64 * t.page;
            assert_eq!(
                calls.last(),
                Some(&PrepareProgress { done: total, total }),
                "{}",
                t.fs
            );
            assert!(
                calls.windows(2).all(|w| w[0].done <= w[1].done),
                "{}: progress went backwards",
                t.fs
            );
            if !t.ram_fs {
                assert_eq!(r.zeroed, 5 * t.page, "{}", t.fs);
            }
            if t.is_xfs() {
                assert!(r.unshared > 0, "xfs: nothing unshared");
            }
            // Data kept where there was data, zeros where there was none.
            assert_eq!(t.read_file(0, 1)[0], t.fill_byte(0), "{}", t.fs);
            assert_eq!(t.read_file(2 * t.page, 1)[0], 0, "{}", t.fs);
            assert_eq!(t.read_file(8 * t.page, 1)[0], 0, "{}", t.fs);
            assert_eq!(
                t.read_file(20 * t.page, 1)[0],
                t.fill_byte(20 * t.page),
                "{}",
                t.fs
            );
            m.pin(a, t.region, 0, 0).unwrap();
        }
    }

    #[test]
    fn prepare_reports_progress_over_a_large_range() {
        let t = TestRegion::on_tmp(1024); // 4 MiB, all hole after the punch
        let m = &t.mapper;
        let a = m.add_owner("a");
        m.acquire(a, t.region, 0, 0, LeaseMode::Exclusive).unwrap();
        t.punch_raw(0, 1024 * t.page);
        let mut n = 0;
        m.prepare(a, t.region, 0, 0, &mut |_| n += 1).unwrap();
        assert!(n >= 4, "only {n} progress reports for 4 MiB");
        m.pin(a, t.region, 0, 0).unwrap();
        assert_eq!(
            m.prepare(a, t.region, 0, 2048 * t.page, &mut |_| {})
                .unwrap_err()
                .errno(),
            libc::ERANGE
        );
    }
}
