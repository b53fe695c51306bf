//! What "flush" means for each backing: the [`Flush`] object the VMM gives the virtio-pmem device.
//!
//! | backing                         | flush does            | why                                               |
//! |---------------------------------|-----------------------|---------------------------------------------------|
//! | Regular (page cache)            | fdatasync             | dirty pages and new block mappings reach the disk |
//! | FsDax, MAP_SHARED fallback      | fdatasync             | data is in pmem, block allocation metadata is not |
//! | FsDax with MAP_SYNC             | nothing               | metadata is made durable at write-fault time; the guest writes back its own CPU caches before it asks |
//! | DevDax                          | nothing               | no file system metadata; the guest flushes CPU caches |
//! | Ram (tmpfs, memfd, hugetlbfs)   | nothing               | RAM: nothing can be made durable                  |
//! | readonly=on / discard_writes=on | nothing               | the file is never written                         |
//!
//! Every flush first checks the file did not shrink under the VM; if it did, the guest gets EIO (its data past
//! the new end is gone) and the host log says so. Failure is sticky: after a shrink or a failed fdatasync every
//! later flush fails too, because a later fdatasync that succeeds says nothing about the pages whose writeback
//! already failed (the kernel reports such an error once) - answering OK would be a lie about durability.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use daxvisor_devices::virtio::pmem::Flush;
use daxvisor_mapper::{Mapper, RegionId};

use super::backing::Backing;
use daxvisor_mapper::BackingKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushAction {
    Fdatasync,
    Nothing,
}

impl FlushAction {
    pub fn for_backing(b: &Backing) -> FlushAction {
        if b.readonly() || b.discard_writes() {
            return FlushAction::Nothing;
        }
        match b.kind() {
            BackingKind::Regular => FlushAction::Fdatasync,
            BackingKind::FsDax if !b.map_sync() => FlushAction::Fdatasync,
            BackingKind::FsDax | BackingKind::DevDax | BackingKind::Ram => FlushAction::Nothing,
        }
    }
}

/// The layout-lease manager's hold on the region while a flush runs: a transient pin over the whole window, so
/// a punch or shrink waits for the flush in flight instead of racing it.
pub struct FlushFence {
    mapper: Mapper,
    region: RegionId,
}

impl FlushFence {
    pub fn new(mapper: Mapper, region: RegionId) -> Self {
        FlushFence { mapper, region }
    }
}

pub struct BackingFlush {
    fence: Option<FlushFence>,
    /// Tests hold a flush at this gate (after its transient pin is taken, before the fdatasync).
    #[cfg(test)]
    gate: Option<std::sync::Arc<std::sync::Barrier>>,
    file: File,
    path: PathBuf,
    /// Bytes of the file the guest sees; a file shorter than this lost guest data.
    size: u64,
    check_shrink: bool,
    action: FlushAction,
    /// Set by the first shrink or fdatasync error; never cleared.
    failed: AtomicBool,
}

impl BackingFlush {
    pub fn new(b: &Backing, fence: Option<FlushFence>) -> io::Result<BackingFlush> {
        let action = FlushAction::for_backing(b);
        tracing::info!(id = b.id(), ?action, "pmem flush policy");
        Ok(BackingFlush {
            fence,
            #[cfg(test)]
            gate: None,
            file: b.file().try_clone()?,
            path: b.path().to_owned(),
            size: b.size(),
            check_shrink: b.dev_dax().is_none(),
            action,
            failed: AtomicBool::new(false),
        })
    }

    pub fn action(&self) -> FlushAction {
        self.action
    }
}

impl Flush for BackingFlush {
    fn on_worker_start(&self) -> io::Result<()> {
        crate::seccomp::apply_for_thread(crate::seccomp::ThreadKind::FlushWorker).map_err(|e| {
            tracing::error!(path = %self.path.display(), "{e}; this region's flushes will fail");
            io::Error::other(e.to_string())
        })?;
        if let Some(name) = std::thread::current().name() {
            crate::threads::inject_test_panic(name);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let _transient = match &self.fence {
            Some(f) => Some(
                f.mapper
                    .transient(f.region, 0, 0)
                    .map_err(|e| io::Error::other(e.to_string()))?,
            ),
            None => None,
        };
        #[cfg(test)]
        if let Some(g) = &self.gate {
            g.wait();
            g.wait();
        }
        self.flush_fenced()
    }

    /// Answered on the device's queue path when the flush does nothing ([`FlushAction::Nothing`]) and the
    /// region's transient pin is free to take (no change drains it): the same checks as [`Flush::flush`] (an
    /// earlier failure, a shrunk file) under the same pin, without the worker thread. A change in progress sends
    /// the request to the worker, which waits for it.
    fn try_now(&self) -> Option<io::Result<()>> {
        if self.action != FlushAction::Nothing {
            return None;
        }
        let _transient = match &self.fence {
            Some(f) => match f.mapper.try_transient(f.region, 0, 0) {
                Ok(Some(pin)) => Some(pin),
                Ok(None) => return None,
                Err(e) => return Some(Err(io::Error::other(e.to_string()))),
            },
            None => None,
        };
        Some(self.flush_fenced())
    }
}

impl BackingFlush {
    /// The flush itself, under the region's transient pin (when it has one).
    fn flush_fenced(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "an earlier flush of this backing failed; durability can no longer be promised",
            ));
        }
        if self.check_shrink {
            if let Some(len) = daxvisor_mapper::shrunk_below(&self.file, self.size)? {
                self.failed.store(true, Ordering::Release);
                tracing::error!(
                    path = %self.path.display(),
                    "pmem backing file shrank to {len} bytes under the running VM (guest sees {}); answering flushes with EIO from now on",
                    self.size
                );
                return Err(io::Error::other("backing file shrank under the VM"));
            }
        }
        let result = match self.action {
            // sync_data is fdatasync(2) and retries on EINTR.
            FlushAction::Fdatasync => self.file.sync_data(),
            FlushAction::Nothing => Ok(()),
        };
        if let Err(e) = &result {
            self.failed.store(true, Ordering::Release);
            tracing::error!(
                path = %self.path.display(),
                "fdatasync of pmem backing failed: {e}; answering flushes with EIO from now on"
            );
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use daxvisor_devices::virtio::pmem::{FlushPolicy, FlushWorker};

    use super::*;
    use crate::lease_manager::LeaseManager;
    use crate::pmem::PmemConfig;

    /// On a tmpfs backing the flush does nothing, so the device may answer it on its queue path: try_now
    /// answers OK under the region's transient pin, still EIO once the file shrank under the VM; while a
    /// punch drains the region it declines (the worker waits instead). A page-cache file never answers inline:
    /// its flush is an fdatasync.
    #[test]
    fn only_a_flush_with_nothing_to_write_back_answers_inline() {
        let leases = LeaseManager::new(Default::default(), Default::default()).unwrap();
        // A 4 MiB create=on region in a new directory under `parent`, at `gpa`, with its fenced flush.
        let fenced_flush = |parent: &str, id: &str, gpa: u64| {
            let dir = tempfile::tempdir_in(parent).unwrap();
            let path = dir.path().join("vm.img");
            let cfg: PmemConfig = format!("file={},size=4M,create=on", path.display())
                .parse()
                .unwrap();
            let backing = Backing::open(&cfg, id).unwrap();
            let region = leases.add_pmem_region(&backing, gpa).unwrap();
            let flush = BackingFlush::new(&backing, Some(leases.fence(region))).unwrap();
            (dir, path, backing, region, flush)
        };
        let (_dir, path, _backing, region, flush) = fenced_flush("/dev/shm", "pm0", 1 << 32);
        assert_eq!(flush.action(), FlushAction::Nothing);
        assert!(matches!(flush.try_now(), Some(Ok(()))));
        assert_eq!(
            leases.mapper().region(region).unwrap().in_flight_io,
            0,
            "pin dropped"
        );

        // A punch that waits for a transient pin drains the region: try_now declines rather than wait.
        let held = leases.mapper().transient(region, 0, 0).unwrap();
        let m = leases.mapper().clone();
        let punch = std::thread::spawn(move || m.punch(None, region, 0, 8192));
        let mut declined = false;
        for _ in 0..3000 {
            if flush.try_now().is_none() {
                declined = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(declined, "try_now answered over a draining region");
        drop(held);
        punch.join().unwrap().unwrap();
        assert!(matches!(flush.try_now(), Some(Ok(()))));

        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        assert!(
            matches!(flush.try_now(), Some(Err(_))),
            "a shrunk file is EIO inline too"
        );

        let (_dir, _, _backing, _, flush) = fenced_flush("/var/tmp", "pm1", 2 << 32);
        assert_eq!(flush.action(), FlushAction::Fdatasync);
        assert!(flush.try_now().is_none());
    }

    /// A guest flush in flight holds its region: a punch asked meanwhile waits for it (the flush's fdatasync
    /// then answers the guest), and only then punches. The real flush worker, the real backing, a real file;
    /// the gate only decides when the fdatasync starts.
    #[test]
    fn a_punch_waits_for_an_in_flight_guest_flush() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("vm.img");
        let cfg: PmemConfig = format!("file={},size=4M,create=on", path.display())
            .parse()
            .unwrap();
        let backing = Backing::open(&cfg, "pm0").unwrap();
        let leases = LeaseManager::new(Default::default(), Default::default()).unwrap();
        let region = leases.add_pmem_region(&backing, 1 << 32).unwrap();
        let mut flush = BackingFlush::new(&backing, Some(leases.fence(region))).unwrap();
        let gate = Arc::new(Barrier::new(2));
        flush.gate = Some(gate.clone());
        let (done_tx, done) = mpsc::channel();
        let worker = FlushWorker::spawn(
            "pmem-flush-test",
            Arc::new(flush),
            FlushPolicy::Coalesce,
            Box::new(move |batch: Vec<u32>, r: &io::Result<()>| {
                let _ = done_tx.send((batch, r.is_ok()));
            }),
        )
        .unwrap();
        // The guest wrote, then asked for a flush; the worker holds the region while it syncs.
        assert!(backing.mapping().write(4096, 0x5a));
        worker.submit([1u32]);
        gate.wait();
        let mapper = leases.mapper().clone();
        assert_eq!(mapper.region(region).unwrap().in_flight_io, 1);
        let (punched_tx, punched) = mpsc::channel();
        let m = mapper.clone();
        std::thread::spawn(move || punched_tx.send(m.punch(None, region, 0, 8192)));
        assert!(
            punched.recv_timeout(Duration::from_millis(300)).is_err(),
            "the punch did not wait for the flush in flight"
        );
        assert_eq!(backing.mapping().read(4096), Some(0x5a), "data still there");
        gate.wait();
        assert_eq!(
            done.recv_timeout(Duration::from_secs(30)).unwrap(),
            (vec![1], true)
        );
        let report = punched
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert!(report.waited_for_transient);
        assert_eq!(
            backing.mapping().read(4096),
            Some(0),
            "punched after the flush"
        );
        assert_eq!(mapper.region(region).unwrap().in_flight_io, 0);
    }
}
