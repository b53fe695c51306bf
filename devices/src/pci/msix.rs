//! MSI-X (PCI 3.0, 6.8.2): the capability, the vector table and the pending-bit array.
//!
//! The table lives in a BAR; the driver writes each vector's message address and data and its mask bit, and
//! turns MSI-X on (and masks the whole function) through the capability's message control. A vector signalled
//! while it is masked (or the function is) sets its pending bit instead; unmasking it delivers the interrupt
//! and clears the bit. Delivery goes through an [`MsiSink`], which the VMM implements with KVM GSI routes and
//! irqfds: [`MsiSink::route`] when a live vector's message changes, [`MsiSink::signal`] to raise it.
//!
//! Table accesses must be 4 or 8 bytes, naturally aligned (PCI 3.0, 6.8.2.6); others are ignored.

use std::sync::{Arc, Mutex, MutexGuard};

/// The MSI-X capability id.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes of one table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors a table may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector masked.
const VECTOR_MASKED: u32 = 1;

/// An MSI message: where the device writes and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (x86: 0xfeeX_XXXX, destination APIC in bits 19:12).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// How MSI-X vectors reach the guest. The VMM implements it with one GSI and one irqfd per vector.
pub trait MsiSink: Send + Sync {
    /// Vector `vector` now delivers `msg` (called when a vector becomes live or its message changes).
    fn route(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()>;
    /// Raise vector `vector` (only called for a live, unmasked vector that was routed).
    fn signal(&self, vector: u16) -> std::io::Result<()>;
}

#[derive(Clone, Copy, Default)]
struct Entry {
    msg: MsiMessage,
    control: u32,
    /// The message last passed to [`MsiSink::route`], if any.
    routed: Option<MsiMessage>,
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

/// The MSI-X table, PBA and enable/mask state of one function. Shared (behind an `Arc`) between the vCPU that
/// programs it and the threads that raise interrupts.
pub struct Msix {
    state: Mutex<State>,
    sink: Arc<dyn MsiSink>,
}

impl Msix {
    /// A table of `vectors` entries (1 to [`MSIX_MAX_VECTORS`], clamped), all masked, MSI-X off.
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Self {
        let n = vectors.clamp(1, MSIX_MAX_VECTORS);
        Msix {
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        control: VECTOR_MASKED,
                        ..Default::default()
                    };
                    usize::from(n)
                ],
                pending: vec![0; usize::from(n).div_ceil(64)],
                enabled: false,
                function_masked: false,
            }),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the table consistent; a panic elsewhere must not stop interrupt delivery.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// Bytes of the table in its BAR.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors()) * MSIX_ENTRY_SIZE
    }

    /// Bytes of the pending-bit array in its BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.lock().pending.len() as u64 * 8
    }

    /// The capability body for [`super::PciConfiguration::add_capability`]: table at `table_offset` and PBA at
    /// `pba_offset` (both 8-byte aligned) in BAR `bar`; and its writable mask (enable and function mask).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let control = self.vectors() - 1;
        let mut body = [0u8; 12];
        body[0] = MSIX_CAPABILITY_ID;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&((table_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&((pba_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        let mut writable = [0u8; 12];
        writable[3] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The message control register as the driver left it; applies MSI-X enable and the function mask (a
    /// vector that becomes deliverable with its pending bit set fires now).
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & MSIX_ENABLE != 0;
        s.function_masked = control & MSIX_FUNCTION_MASK != 0;
        for v in 0..s.entries.len() {
            self.sync(&mut s, v);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.lock()
            .pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// Raise `vector`: delivered now if it is live, else its pending bit is set (if MSI-X is off, nothing
    /// happens: this device has no INTx). A vector outside the table is ignored.
    pub fn signal(&self, vector: u16) {
        let mut s = self.lock();
        let v = usize::from(vector);
        let Some(e) = s.entries.get(v).copied() else {
            return;
        };
        if !s.enabled {
            return;
        }
        if s.function_masked || e.control & VECTOR_MASKED != 0 || e.routed.is_none() {
            s.pending[v / 64] |= 1 << (v % 64);
            return;
        }
        if let Err(err) = self.sink.signal(vector) {
            tracing::warn!(vector, "cannot raise MSI-X vector: {err}");
        }
    }

    /// Route a vector whose message changed, and deliver its pending interrupt once it is unmasked.
    fn sync(&self, s: &mut State, v: usize) {
        let Some(e) = s.entries.get(v).copied() else {
            return;
        };
        let live = s.enabled && !s.function_masked && e.control & VECTOR_MASKED == 0;
        if !live {
            return;
        }
        if e.routed != Some(e.msg) {
            if let Err(err) = self.sink.route(v as u16, e.msg) {
                // Debug: the message is the guest's (KVM may refuse it), and a guest must not flood the log.
                tracing::debug!(vector = v, "cannot route MSI-X vector: {err}");
                return;
            }
            s.entries[v].routed = Some(e.msg);
        }
        if s.pending[v / 64] & (1 << (v % 64)) != 0 {
            s.pending[v / 64] &= !(1 << (v % 64));
            if let Err(err) = self.sink.signal(v as u16) {
                tracing::warn!(vector = v, "cannot raise MSI-X vector: {err}");
            }
        }
    }

    /// A driver read of the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = self.lock();
        let Some((v, field)) = table_access(offset, data.len()) else {
            return;
        };
        let Some(e) = s.entries.get(v) else {
            return;
        };
        let dwords = [
            e.msg.address as u32,
            (e.msg.address >> 32) as u32,
            e.msg.data,
            e.control,
        ];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(d) = dwords.get(field + i) {
                chunk.copy_from_slice(&d.to_le_bytes());
            }
        }
    }

    /// A driver write to the table at `offset`.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let Some((v, field)) = table_access(offset, data.len()) else {
            tracing::debug!(offset, len = data.len(), "MSI-X table access ignored");
            return;
        };
        let Some(e) = s.entries.get_mut(v) else {
            return;
        };
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let d = u32::from_le_bytes(b);
            match field + i {
                0 => e.msg.address = (e.msg.address & !0xffff_ffff) | u64::from(d),
                1 => e.msg.address = (e.msg.address & 0xffff_ffff) | (u64::from(d) << 32),
                2 => e.msg.data = d,
                // Only the mask bit of vector control is defined.
                _ => e.control = d & VECTOR_MASKED,
            }
        }
        self.sync(&mut s, v);
    }

    /// A driver read of the pending-bit array at `offset` (writes to it are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let s = self.lock();
        let Some(word) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| s.pending.get(i))
        else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }
}

/// `(vector, first dword within its entry)` for a 4- or 8-byte aligned table access; None otherwise.
fn table_access(offset: u64, len: usize) -> Option<(usize, usize)> {
    if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
        return None;
    }
    let v = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
    Some((v, ((offset % MSIX_ENTRY_SIZE) / 4) as usize))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    /// A sink with one real EventFd per vector (what KVM's irqfds would be) and a log of routes.
    pub(crate) struct EventFdSink {
        pub fds: Vec<EventFd>,
        pub routes: Mutex<Vec<(u16, MsiMessage)>>,
    }

    impl EventFdSink {
        pub(crate) fn new(vectors: u16) -> Arc<Self> {
            Arc::new(EventFdSink {
                fds: (0..vectors)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                routes: Mutex::new(Vec::new()),
            })
        }
        /// How many times `vector` fired since the last call.
        pub(crate) fn fired(&self, vector: u16) -> u64 {
            self.fds[usize::from(vector)].read().unwrap_or(0)
        }
    }

    impl MsiSink for EventFdSink {
        fn route(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((vector, msg));
            Ok(())
        }
        fn signal(&self, vector: u16) -> std::io::Result<()> {
            self.fds[usize::from(vector)].write(1)
        }
    }

    fn program(m: &Msix, v: u64, addr: u32, data: u32) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 4, &0u32.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    fn unmask(m: &Msix, v: u64) {
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn vectors_fire_only_when_enabled_routed_and_unmasked() {
        let sink = EventFdSink::new(3);
        let m = Msix::new(3, sink.clone());
        program(&m, 1, 0xfee0_0000, 0x41);
        m.signal(1);
        assert_eq!(sink.fired(1), 0, "MSI-X off: dropped (no INTx)");
        assert!(!m.pending(1));
        m.set_control(MSIX_ENABLE);
        m.signal(1);
        assert_eq!(sink.fired(1), 0, "vector masked: pending");
        assert!(m.pending(1));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        unmask(&m, 1);
        assert_eq!(sink.fired(1), 1, "unmasking delivers the pending interrupt");
        assert!(!m.pending(1));
        assert_eq!(
            sink.routes.lock().unwrap().as_slice(),
            &[(
                1,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            )]
        );
        m.signal(1);
        assert_eq!(sink.fired(1), 1);
        // Function mask holds every vector.
        m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        m.signal(1);
        assert_eq!(sink.fired(1), 0);
        assert!(m.pending(1));
        m.set_control(MSIX_ENABLE);
        assert_eq!(sink.fired(1), 1);
        // A message change on a live vector re-routes it; an unchanged one does not.
        program(&m, 1, 0xfee0_1000, 0x42);
        unmask(&m, 1);
        assert_eq!(
            sink.routes.lock().unwrap().len(),
            3,
            "address then data changed"
        );
        // Out-of-range vectors and table offsets are ignored.
        m.signal(7);
        m.write_table(0x1000, &[0xff; 4]);
        let mut b = [0xffu8; 4];
        m.read_table(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn table_reads_back_and_rejects_odd_accesses() {
        let sink = EventFdSink::new(2);
        let m = Msix::new(2, sink);
        let mut b8 = [0u8; 8];
        m.read_table(8, &mut b8);
        assert_eq!(b8, [0, 0, 0, 0, 1, 0, 0, 0], "data 0, masked");
        m.write_table(16, &0x1_fee0_0000u64.to_le_bytes());
        m.read_table(16, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1_fee0_0000);
        // Reserved vector-control bits read as zero.
        m.write_table(28, &0xffff_fffeu32.to_le_bytes());
        let mut b4 = [0u8; 4];
        m.read_table(28, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0);
        // Two-byte and misaligned accesses change nothing.
        m.write_table(16, &[1, 2]);
        m.write_table(18, &[1, 2, 3, 4]);
        m.read_table(16, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1_fee0_0000);
        let (cap, w) = m.capability(0, 0x4000, 0x6000);
        assert_eq!(cap[..4], [0x11, 0, 1, 0]);
        assert_eq!(u32::from_le_bytes([cap[4], cap[5], cap[6], cap[7]]), 0x4000);
        assert_eq!(w[3], 0xc0);
    }
}
