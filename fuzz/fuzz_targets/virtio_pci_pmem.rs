//! The PCI root bus with a virtio-pci function and a real virtio-pmem device behind it (its flush worker thread
//! and a real fdatasync on a file in /dev/shm), driven as a hostile guest would: configuration-space reads and
//! writes through ECAM and the 0xCF8/0xCFC ports (BAR sizing and moves, command, capabilities, MSI-X control),
//! BAR 0 accesses of any width through the PCI memory window (common configuration, ISR, device configuration,
//! notifications, MSI-X table and PBA), writes anywhere in guest memory, and turns of the event loop. Nothing
//! may panic or hang, and MSI-X may only raise vectors of its table.

#![no_main]

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use daxvisor_devices::bus::BusDevice;
use daxvisor_devices::pci::{MsiMessage, MsiSink, PciConfigIo, PciEcam, PciMmioWindow, PciRoot};
use daxvisor_devices::virtio::pci::{VirtioPciDevice, VirtioPciSubscriber};
use daxvisor_devices::virtio::pmem::{Pmem, PmemConfig};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;
const WINDOW: u64 = 0xc000_0000;
const BAR: u64 = 0xc000_8000;
/// Operations per input: bounds the time of one execution.
const MAX_OPS: usize = 256;

fn flush_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = format!("/dev/shm/daxvisor-fuzz-pci-{}", std::process::id());
        let f = File::create(&path).expect("flush file in /dev/shm");
        let _ = std::fs::remove_file(&path);
        f
    })
}

/// Stands in for KVM's GSI routes and irqfds: checks every vector is one of the table's.
struct Sink {
    vectors: u16,
    raised: AtomicU64,
}

impl MsiSink for Sink {
    fn route(&self, vector: u16, _msg: MsiMessage) -> std::io::Result<()> {
        assert!(
            vector < self.vectors,
            "route for vector {vector} outside the table"
        );
        Ok(())
    }
    fn signal(&self, vector: u16) -> std::io::Result<()> {
        assert!(
            vector < self.vectors,
            "signal for vector {vector} outside the table"
        );
        self.raised.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    let flush = Arc::new(|| flush_file().sync_data());
    let pmem = Pmem::new(
        "fuzz",
        PmemConfig {
            start: 0x1_0000_0000,
            size: 0x20_0000,
        },
        flush,
    )
    .expect("pmem device");
    let sink = Arc::new(Sink {
        vectors: 2,
        raised: AtomicU64::new(0),
    });
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(mem.clone(), Box::new(pmem), sink, BAR).expect("transport"),
    ));
    let root = PciRoot::new();
    root.add_device(dev.clone()).expect("bus slot");
    let root = Arc::new(root);
    let mut ecam = PciEcam::new(root.clone());
    let mut ports = PciConfigIo::new(root.clone());
    let mut window = PciMmioWindow::new(root, WINDOW);
    let mut em = EventManager::<VirtioPciSubscriber>::new().expect("event manager");
    em.add_subscriber(VirtioPciSubscriber::new(dev));

    for op in data.chunks_exact(8).take(MAX_OPS) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&op[4..8]);
        match op[0] % 8 {
            // Configuration space of device 1 (and, with the high bits, other devices and functions).
            0 => ecam.write(
                (1 << 15) | (offset & 0xfff) | (u64::from(op[3] >> 2) << 15),
                &buf[..width],
            ),
            1 => ecam.read((1 << 15) | (offset & 0xfff), &mut buf[..width]),
            // BAR 0, wherever the driver left it, through the window.
            2 => window.write((BAR - WINDOW + (offset & 0x7fff)) & 0xf_ffff, &buf[..width]),
            3 => window.read(
                (BAR - WINDOW + (offset & 0x7fff)) & 0xf_ffff,
                &mut buf[..width],
            ),
            4 => ports.write(offset & 7, &buf[..width]),
            5 => ports.read(offset & 7, &mut buf[..width]),
            6 => {
                let _ = mem.write_slice(&op[4..8], GuestAddress(offset * 4 % MEM as u64));
            }
            _ => {
                let _ = em.run_with_timeout(0);
            }
        }
    }
    let _ = em.run_with_timeout(0);
});
