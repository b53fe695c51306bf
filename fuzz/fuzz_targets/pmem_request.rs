//! The virtio-pmem request parser on whatever a guest can put in a queue: the input is guest memory (descriptor
//! table, available ring, request buffers), the queue is a real split queue, and every chain it yields is parsed.
//! The parser must never panic, read outside guest memory, or accept a chain that is not a flush request.

#![no_main]

use daxvisor_devices::virtio::pmem::request;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 0x10000;
const QUEUE_SIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let n = data.len().min(MEM);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let Ok(mut q) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    q.set_size(QUEUE_SIZE);
    // Descriptor table at 0 (16 x 16 bytes), available ring at 0x100, used ring at 0x200: the fuzzer writes all three.
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let Ok(iter) = q.iter(&mem) else {
        return;
    };
    for chain in iter.take(usize::from(QUEUE_SIZE)) {
        match request::parse(chain, &mem) {
            Ok(r) => assert!(mem.check_address(r.status).is_some()),
            Err(bad) => {
                if let Some(s) = bad.status {
                    assert!(mem.check_address(s).is_some());
                }
            }
        }
    }
});
