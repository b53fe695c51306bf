//! The virtio-mmio transport with a real virtio-pmem device behind it (its flush worker thread and a real
//! fdatasync on a file in /dev/shm), driven as a hostile guest would: register reads and writes of any width at
//! any offset, writes anywhere in guest memory (rings, descriptors, requests), and turns of the event loop that
//! processes queue notifications. Nothing may panic, hang or touch memory outside the guest's.

#![no_main]

use std::fs::File;
use std::sync::{Arc, Mutex, OnceLock};

use daxvisor_devices::bus::BusDevice;
use daxvisor_devices::virtio::mmio::lock;
use daxvisor_devices::virtio::pmem::{Pmem, PmemConfig};
use daxvisor_devices::virtio::{MmioSubscriber, MmioTransport};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 0x10000;
/// Operations per input: bounds the time of one execution.
const MAX_OPS: usize = 256;

fn flush_file() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = format!("/dev/shm/daxvisor-fuzz-{}", std::process::id());
        let f = File::create(&path).expect("flush file in /dev/shm");
        let _ = std::fs::remove_file(&path);
        f
    })
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
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(mem.clone(), Box::new(pmem)).expect("transport"),
    ));
    let mut em = EventManager::<MmioSubscriber>::new().expect("event manager");
    em.add_subscriber(MmioSubscriber::new(transport.clone()));

    let mut ops = data.chunks_exact(8).take(MAX_OPS);
    for op in &mut ops {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = [op[4], op[5], op[6], op[7]];
        let width = [1usize, 2, 4, 8][usize::from(op[3] & 3)];
        match op[0] % 4 {
            0 => {
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&value);
                lock(&transport).write(offset & 0x1ff, &buf[..width]);
            }
            1 => {
                let mut buf = [0u8; 8];
                lock(&transport).read(offset & 0x1ff, &mut buf[..width]);
            }
            2 => {
                // Guest memory: the rings and requests the device will read.
                let _ = mem.write_slice(&value, GuestAddress(offset * 4 % MEM as u64));
            }
            _ => {
                let _ = em.run_with_timeout(0);
            }
        }
    }
    let _ = em.run_with_timeout(0);
});
