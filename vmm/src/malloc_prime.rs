//! glibc reads `/proc/sys/vm/overcommit_memory` (an `openat`) the first time any thread's malloc arena heap
//! shrinks, and caches the answer. Which thread that is depends on timing; when it is one whose seccomp list has
//! no `openat` (the main thread after start-up), the kernel kills daxvisor with SIGSYS, seen at a VM's stop.
//! [`prime`] makes that first shrink happen at start, before any filter: a short-lived thread grows its own
//! arena's heap well past the trim threshold and frees it.

/// Have glibc read what it reads lazily on an arena heap's first shrink, now, while every syscall is allowed.
pub fn prime() {
    let primer = std::thread::Builder::new()
        .name("malloc-prime".into())
        .spawn(|| {
            // Small blocks (below the mmap threshold) come from this thread's arena heap; freeing them all
            // leaves a top chunk far above the trim threshold, so the heap shrinks.
            let blocks: Vec<Vec<u8>> = (0..2048).map(|_| vec![1u8; 2048]).collect();
            drop(blocks);
        });
    if let Ok(t) = primer {
        let _ = t.join();
    }
}
