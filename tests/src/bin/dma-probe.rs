//! DMA pins on real VFIO, in the DAX lab with `--iommu` (images/lab/README.md): drives the mapper crate's API with
//! its VFIO backend on the lab's vfio-pci group and prints one line per observation, for tests/lab.rs. Each
//! region is 4 MiB at IOVA 0x100000000; pins take its first 2 MiB.
//!
//!   dma-probe GROUP pin KIND PATH   a region of KIND (devdax, memfd, fsdax, fsdax-shared, fsdax-private,
//!                                   pagecache) over PATH (ignored for memfd; fsdax maps MAP_SYNC, fsdax-shared
//!                                   plain MAP_SHARED, fsdax-private MAP_PRIVATE): the region's DMA rule; exclusive lease and pin (MAP_DMA); whether the
//!                                   container maps the IOVA; on a file with a layout, a punch over the pinned
//!                                   range; unpin and the container again. When the mapper refuses the pin, the
//!                                   raw VFIO_IOMMU_MAP_DMA of the same range is tried once, for the record.
//!   dma-probe GROUP teardown        on a memfd region: a pin ended by unpin, by a revoke after a break deadline
//!                                   and by owner exit, the container checked before and after each
//!
//! Exit status 0 when every step ran, whatever the kernel answered (the test judges the lines); 1 otherwise.

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use daxvisor_mapper::{
    errno_name, probe, BackingKind, BreakPolicy, ChangeRequest, ChannelNotifier, DmaMapper,
    HostMapping, LayoutChange, LeaseMode, MapOptions, Mapper, OwnerId, PinId, RegionDesc, RegionId,
    VfioContainer,
};

const REGION: u64 = 4 << 20;
const PIN: u64 = 2 << 20;
/// IOVA of region offset 0 (a guest physical address above 4 GiB, as a VMM would give).
const IOVA: u64 = 0x1_0000_0000;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1..).unwrap_or_default() {
        [group, cmd, kind, path] if cmd == "pin" => {
            pin_scenario(Path::new(group), kind, Path::new(path))
        }
        [group, cmd] if cmd == "teardown" => teardown_scenario(Path::new(group)),
        _ => Err(
            "usage: dma-probe /dev/vfio/N pin devdax|memfd|fsdax|fsdax-shared|fsdax-private|pagecache PATH | \
                  dma-probe /dev/vfio/N teardown"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("dma-probe: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A mapper with the VFIO container as its DMA mapper and one region.
struct Setup {
    mapper: Mapper,
    container: Arc<VfioContainer>,
    region: RegionId,
    mapping: Arc<HostMapping>,
    kind: BackingKind,
}

fn setup(group: &Path, kind: &str, path: &Path) -> Res<Setup> {
    let container = Arc::new(
        VfioContainer::with_group(group)
            .map_err(|e| format!("VFIO container with {}: {e}", group.display()))?,
    );
    let file = Arc::new(open_backing(kind, path)?);
    let probed = probe(&file, Path::new("/sys")).map_err(|e| format!("probe {kind}: {e}"))?;
    // fsdax maps MAP_SHARED_VALIDATE|MAP_SYNC as daxvisor does; fsdax-shared and fsdax-private map the same kind
    // of file plain MAP_SHARED and MAP_PRIVATE (the kernel refuses FS-DAX pins in every mapping).
    let opts = MapOptions {
        want_sync: kind == "fsdax",
        private: kind == "fsdax-private",
        align: 2 << 20,
        ..MapOptions::default()
    };
    let mapping =
        Arc::new(HostMapping::map(&file, 0, REGION, opts).map_err(|e| format!("map {kind}: {e}"))?);
    println!(
        "{kind}: backing={} mapping={}",
        probed.kind,
        mapping.flags_str()
    );
    let (notifier, _events) = ChannelNotifier::new();
    let dma: Arc<dyn DmaMapper> = container.clone();
    let mapper = Mapper::new(Arc::new(notifier), Some(dma));
    let region = mapper
        .add_region(
            RegionDesc::new(file, 0, REGION, probed.kind)
                .with_mapping(mapping.clone())
                .with_iova(IOVA)
                .with_name(kind),
        )
        .map_err(|e| format!("add_region {kind}: {e}"))?;
    Ok(Setup {
        mapper,
        container,
        region,
        mapping,
        kind: probed.kind,
    })
}

fn open_backing(kind: &str, path: &Path) -> Res<File> {
    let file = match kind {
        "memfd" => {
            // SAFETY: a NUL-terminated name; the fd is owned by the File made from it.
            let fd = unsafe { libc::memfd_create(c"dma-probe".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh fd nothing else owns.
            unsafe { File::from_raw_fd(fd) }
        }
        "devdax" => {
            return OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("open {}: {e}", path.display()))
        }
        "fsdax" | "fsdax-shared" | "fsdax-private" | "pagecache" => OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| format!("create {}: {e}", path.display()))?,
        _ => return Err(format!("unknown kind {kind}")),
    };
    // Real blocks everywhere (no holes, no unwritten extents), on disk: a pin's extents must be stable.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..REGION / chunk.len() as u64 {
        file.write_all_at(&chunk, i * chunk.len() as u64)
            .map_err(|e| format!("write {kind}: {e}"))?;
    }
    file.sync_all().map_err(|e| format!("fsync {kind}: {e}"))?;
    Ok(file)
}

/// Prints and returns whether the container maps the region's IOVA, as the kernel answers.
fn container_state(label: &str, when: &str, c: &VfioContainer) -> Res<bool> {
    let mapped = c
        .iova_mapped(IOVA)
        .map_err(|e| format!("ask the container about {IOVA:#x}: {e}"))?;
    println!(
        "{label}: {when}: container-maps-iova={} recorded={:?}",
        if mapped { "yes" } else { "no" },
        c.mappings()
    );
    Ok(mapped)
}

fn rule_line(label: &str, when: &str, s: &Setup) -> Res<()> {
    let snap = s.mapper.snapshot();
    let view = snap
        .regions
        .iter()
        .find(|r| r.id == s.region)
        .ok_or("the region is missing from the snapshot")?;
    println!(
        "{label}: {when}: rule={} dma-pinnable={}",
        view.dma_rule.name(),
        if view.dma_rule.pinnable() {
            "yes"
        } else {
            "no"
        }
    );
    Ok(())
}

/// Exclusive lease (where the backing has a layout) and pin of the region's first 2 MiB.
fn lease_and_pin(s: &Setup, owner: OwnerId) -> Res<Result<PinId, String>> {
    if s.kind.has_layout() {
        s.mapper
            .acquire(owner, s.region, 0, PIN, LeaseMode::Exclusive)
            .map_err(|e| format!("exclusive lease: {e}"))?;
    }
    Ok(s.mapper
        .pin(owner, s.region, 0, PIN)
        .map_err(|e| format!("{} {e}", e.errno_name())))
}

fn pin_scenario(group: &Path, kind: &str, path: &Path) -> Res<()> {
    let s = setup(group, kind, path)?;
    let m = &s.mapper;
    rule_line(kind, "added", &s)?;
    let owner = m.add_owner("dma-ctx");
    match lease_and_pin(&s, owner)? {
        Ok(pin) => {
            let snap = m.snapshot();
            let dma = snap
                .pins()
                .into_iter()
                .find(|(_, p)| p.id == pin)
                .and_then(|(_, p)| p.dma);
            println!("{kind}: pin=ok dma={dma:?}");
            container_state(kind, "pinned", &s.container)?;
            if s.kind.has_layout() {
                match m.punch(None, s.region, 0, 4096) {
                    Err(e) => println!("{kind}: punch={} {e}", e.errno_name()),
                    Ok(r) => println!("{kind}: punch=ok {r:?}"),
                }
            }
            m.unpin(owner, pin).map_err(|e| format!("unpin: {e}"))?;
            println!("{kind}: unpin=ok");
            container_state(kind, "unpinned", &s.container)?;
        }
        Err(e) => {
            println!("{kind}: pin={e}");
            rule_line(kind, "refused", &s)?;
            container_state(kind, "refused", &s.container)?;
            // For the record: the kernel's own answer to VFIO_IOMMU_MAP_DMA of the same range.
            // SAFETY: the region's mapping stays alive (held by `s`) until after the unmap below; nothing here
            // holds a Rust reference into it.
            match unsafe { s.container.map_vaddr(IOVA, s.mapping.addr(), PIN) } {
                Ok(()) => {
                    println!("{kind}: raw-map-dma=ok");
                    s.container
                        .unmap(IOVA, PIN)
                        .map_err(|e| format!("unmap after the raw map: {e}"))?;
                }
                Err(e) => println!(
                    "{kind}: raw-map-dma={} {e}",
                    e.raw_os_error().map_or("?", errno_name)
                ),
            }
        }
    }
    m.owner_exit(owner)
        .map_err(|e| format!("owner exit: {e}"))?;
    Ok(())
}

fn teardown_scenario(group: &Path) -> Res<()> {
    let s = setup(group, "memfd", Path::new("-"))?;
    let m = &s.mapper;

    let a = m.add_owner("dma-unpin");
    let pin = lease_and_pin(&s, a)??;
    container_state("unpin", "pinned", &s.container)?;
    m.unpin(a, pin).map_err(|e| format!("unpin: {e}"))?;
    container_state("unpin", "after", &s.container)?;
    m.owner_exit(a).map_err(|e| format!("owner exit: {e}"))?;

    // A holder that never answers a break: a shared lease on the second half, a pin on the first. The punch
    // of the second half, past its deadline, revokes: DMA first, then the leases.
    let b = m.add_owner("dma-unresponsive");
    m.acquire(b, s.region, PIN, PIN, LeaseMode::Shared)
        .map_err(|e| format!("shared lease: {e}"))?;
    lease_and_pin(&s, b)??;
    container_state("revoke", "pinned", &s.container)?;
    let report = m
        .change(ChangeRequest {
            deadline: Duration::from_millis(200),
            policy: BreakPolicy::Revoke,
            ..ChangeRequest::new(s.region, LayoutChange::Punch { off: PIN, len: PIN })
        })
        .map_err(|e| format!("revoking punch: {e}"))?;
    let revoked_dma = m
        .snapshot()
        .pins()
        .iter()
        .filter(|(_, p)| p.dma_revoked)
        .count();
    println!(
        "revoke: revoked-owners={} pins-with-dma-revoked={revoked_dma}",
        report.revoked.len()
    );
    container_state("revoke", "after", &s.container)?;
    m.owner_exit(b).map_err(|e| format!("owner exit: {e}"))?;

    let c = m.add_owner("dma-exits");
    lease_and_pin(&s, c)??;
    container_state("exit", "pinned", &s.container)?;
    m.owner_exit(c).map_err(|e| format!("owner exit: {e}"))?;
    container_state("exit", "after", &s.container)?;
    Ok(())
}
