//! Uses the mapper crate as an outside project would: a region at a nonzero offset of a real file, an
//! exclusive lease, a pin, and a punch over the pinned range that the mapper refuses, naming the holder.
//!
//! Usage: mapper-outside-user DIR   (creates DIR/backing.img; run as root or with RLIMIT_MEMLOCK >= 1 MiB)

use std::path::Path;
use std::sync::Arc;

use daxvisor_mapper::{
    probe, ChannelNotifier, HostMapping, LeaseMode, MapOptions, Mapper, MapperError, RegionDesc,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: mapper-outside-user DIR")?;
    let path = Path::new(&dir).join("backing.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // 8 MiB of written data: stable extents, nothing for prepare to do.
    std::io::Write::write_all(&mut &file, &vec![0x11u8; 8 << 20])?;
    file.sync_all()?;
    let file = Arc::new(file);

    // The window [2 MiB, 6 MiB) of the file.
    let (offset, size) = (2u64 << 20, 4u64 << 20);
    let kind = probe(&file, Path::new("/sys"))?.kind;
    let mapping = Arc::new(HostMapping::map(&file, offset, size, MapOptions::default())?);
    let (notifier, _notices) = ChannelNotifier::new();
    let mapper = Mapper::new(Arc::new(notifier), None);
    let region = mapper.add_region(
        RegionDesc::new(file, offset, size, kind)
            .with_mapping(mapping)
            .with_name("vm1-pmem0"),
    )?;
    println!("region: {region} at file offset {offset:#x}, {size:#x} bytes, {kind}");

    let dma = mapper.add_owner("nic-dma");
    let lease = mapper.acquire(dma, region, 0, 1 << 20, LeaseMode::Exclusive)?;
    println!("lease: {lease} exclusive [0x0, 0x100000)");
    let pin = mapper.pin(dma, region, 0, 1 << 20)?;
    println!("pin: {pin}");

    match mapper.punch(None, region, 0x1000, 0x1000) {
        Err(e @ MapperError::TextBusy { .. }) => println!("punch: {} {e}", e.errno_name()),
        other => return Err(format!("punch over a pinned range: {other:?}").into()),
    }
    // Outside the window: refused, whatever is held.
    match mapper.punch(None, region, size, 0x1000) {
        Err(e) => println!("punch past the window: {}", e.errno_name()),
        Ok(r) => return Err(format!("punch past the window succeeded: {r:?}").into()),
    }
    mapper.unpin(dma, pin)?;
    mapper.release(dma, lease)?;
    let report = mapper.punch(None, region, 0x1000, 0x1000)?;
    println!("punch after release: ok, range {:?}", report.range);
    Ok(())
}
