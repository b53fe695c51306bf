//! A type-0 PCI configuration space: the header, BARs with sizing semantics and a capability list.
//!
//! The space is 4 KiB (what ECAM exposes); the header and capabilities live in the first 256 bytes and the
//! extended space reads as zero. Every dword has a mask of the bits the driver may change: everything else
//! (ids, class, BAR type bits, the capability chain) ignores writes. A BAR register keeps only its address bits
//! above the BAR's size, so writing all ones and reading back yields the size mask (PCI 3.0, 6.2.5.1).

/// Vendor id.
pub const VENDOR_ID: usize = 0x00;
/// Command register (16 bits at 0x04).
pub const COMMAND: usize = 0x04;
/// Status register (16 bits at 0x06).
pub const STATUS: usize = 0x06;
/// First BAR register.
pub const BAR0: usize = 0x10;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line (written by the OS, unused by us) and pin (0: no INTx).
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command: respond to memory-space accesses (BARs decode only with it).
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: the device may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: a capability list is present.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Number of BAR registers of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Bytes of configuration space behind ECAM (PCIe extended space included).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes where the header and the legacy capability list live.
const LEGACY_SPACE_SIZE: usize = 256;
/// Capabilities go after the 64-byte header.
const FIRST_CAPABILITY: usize = 0x40;

const BAR_MEM_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

/// The size and kind of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Bytes; a power of two, at least 16 (4 KiB or more in practice, so a BAR never shares a page).
    pub size: u64,
    /// A 64-bit BAR takes the next register for its upper half.
    pub is_64bit: bool,
    /// Reads have no side effects.
    pub prefetchable: bool,
}

/// Why a BAR or capability could not be added (VMM-side setup errors, never guest input).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigurationError {
    /// The BAR index is out of range, or its register (or the upper half's) is already used.
    #[error("BAR {0} is out of range or already in use")]
    BarInUse(usize),
    /// The BAR size is not a power of two of at least 16 bytes (or above 4 GiB for a 32-bit BAR).
    #[error("BAR size {0:#x} is not a power of two between 16 bytes and the BAR's reach")]
    BarSize(u64),
    /// The address is not aligned to the BAR's size or does not fit its width.
    #[error("BAR address {0:#x} is not naturally aligned or does not fit")]
    BarAddress(u64),
    /// The capability does not fit in the 256-byte configuration space.
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooBig(usize),
}

/// What identifies a function on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class_code: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

/// The configuration space of one function.
#[derive(Clone)]
pub struct PciConfiguration {
    regs: Vec<u32>,
    writable: Vec<u32>,
    bars: [Option<BarSpec>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    /// A header for `id`: memory decoding off, no BARs, no capabilities, no INTx pin.
    pub fn new(id: PciIdentity) -> Self {
        let mut c = PciConfiguration {
            regs: vec![0; CONFIG_SPACE_SIZE / 4],
            writable: vec![0; CONFIG_SPACE_SIZE / 4],
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.regs[0] = u32::from(id.vendor_id) | (u32::from(id.device_id) << 16);
        c.regs[2] = u32::from(id.revision) | ((id.class_code & 0xff_ffff) << 8);
        c.regs[0x2c / 4] = u32::from(id.subsystem_vendor_id) | (u32::from(id.subsystem_id) << 16);
        // Command: memory space, bus master, INTx disable. Status bits are read-only here.
        c.writable[COMMAND / 4] =
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        // Interrupt line: scratch for the OS.
        c.writable[INTERRUPT_LINE / 4] = 0xff;
        c
    }

    /// Declare BAR `index`, its registers reading `address` (naturally aligned, fitting the BAR's width).
    pub fn add_bar(
        &mut self,
        index: usize,
        spec: BarSpec,
        address: u64,
    ) -> Result<(), ConfigurationError> {
        let last = if spec.is_64bit { index + 1 } else { index };
        if last >= NUM_BARS
            || self.bars[index].is_some()
            || self.bars[last].is_some()
            || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit))
        {
            return Err(ConfigurationError::BarInUse(index));
        }
        let max = if spec.is_64bit { 1 << 63 } else { 1 << 31 };
        if !spec.size.is_power_of_two() || spec.size < 16 || spec.size > max {
            return Err(ConfigurationError::BarSize(spec.size));
        }
        if !address.is_multiple_of(spec.size) || (!spec.is_64bit && address > u64::from(u32::MAX)) {
            return Err(ConfigurationError::BarAddress(address));
        }
        let mask = !(spec.size - 1);
        let mut flags = 0;
        if spec.is_64bit {
            flags |= BAR_MEM_64;
        }
        if spec.prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        let reg = BAR0 / 4 + index;
        self.regs[reg] = (address as u32 & 0xffff_fff0) | flags;
        self.writable[reg] = mask as u32 & 0xffff_fff0;
        if spec.is_64bit {
            self.regs[reg + 1] = (address >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    /// Append a capability: `body` starts with the capability id; the next-pointer byte (`body[1]`) is filled in.
    /// `writable` gives, per byte of `body`, the bits the driver may change. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigurationError> {
        let len = body.len().max(2);
        // Capabilities are dword aligned.
        let offset = self.next_capability;
        let end = offset + len;
        if end > LEGACY_SPACE_SIZE || writable.len() > body.len() {
            return Err(ConfigurationError::CapabilityTooBig(body.len()));
        }
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { b });
        }
        for (i, &w) in writable.iter().enumerate() {
            if i > 1 {
                let at = offset + i;
                self.writable[at / 4] |= u32::from(w) << ((at % 4) * 8);
            }
        }
        match self.last_capability {
            None => {
                self.set_byte(CAPABILITIES_POINTER, offset as u8);
                self.regs[STATUS / 4] |= u32::from(STATUS_CAPABILITIES) << 16;
            }
            Some(prev) => self.set_byte(prev + 1, offset as u8),
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, at: usize, v: u8) {
        let shift = (at % 4) * 8;
        let r = &mut self.regs[at / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
    }

    /// The dword at register index `reg` (offset / 4); outside the space reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Write `data` (1, 2 or 4 bytes, not crossing the dword) at byte `offset` within dword `reg`; bits the
    /// driver may not change keep their value. Other widths and positions are ignored.
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let Some((value, mask)) = merge_bytes(offset, data) else {
            return;
        };
        let (Some(r), Some(&w)) = (self.regs.get(reg).copied(), self.writable.get(reg)) else {
            return;
        };
        let mask = mask & w;
        self.regs[reg] = (r & !mask) | (value & mask);
    }

    /// Bytes `offset..offset + data.len()` of the space (for the device's own capability fields).
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            *b = self
                .regs
                .get(at / 4)
                .map_or(0xff, |r| (r >> ((at % 4) * 8)) as u8);
        }
    }

    /// Overwrite bytes of the space regardless of the write mask (the device updating its own fields).
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if offset + i < CONFIG_SPACE_SIZE {
                self.set_byte(offset + i, b);
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[COMMAND / 4] as u16
    }

    /// The declared BAR at `index`, if any.
    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently holds (whatever the driver last wrote, masked to the BAR's size).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.regs[reg] & 0xffff_fff0);
        let high = if spec.is_64bit {
            u64::from(self.regs[reg + 1]) << 32
        } else {
            0
        };
        Some(high | low)
    }

    /// BAR `index` as the device decodes it now: `(address, size)` when memory decoding is on, the BAR is not
    /// in the middle of sizing (all ones) and the range does not wrap.
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let spec = self.bar_spec(index)?;
        let addr = self.bar_address(index)?;
        let sizing = !(spec.size - 1) & if spec.is_64bit { u64::MAX } else { 0xffff_ffff };
        if addr == sizing & !0xf || addr == 0 {
            return None;
        }
        addr.checked_add(spec.size).map(|_| (addr, spec.size))
    }

    /// Turn memory decoding on (what firmware does for devices it placed).
    pub fn enable_memory(&mut self) {
        self.regs[COMMAND / 4] |= u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    }
}

/// The dword value and byte mask of a 1-, 2- or 4-byte access at byte `offset` of a dword; None for any other
/// width or for an access crossing the dword.
pub fn merge_bytes(offset: usize, data: &[u8]) -> Option<(u32, u32)> {
    if !matches!(data.len(), 1 | 2 | 4)
        || !offset.is_multiple_of(data.len())
        || offset + data.len() > 4
    {
        return None;
    }
    let mut value = 0u32;
    let mut mask = 0u32;
    for (i, &b) in data.iter().enumerate() {
        let shift = (offset + i) * 8;
        value |= u32::from(b) << shift;
        mask |= 0xff << shift;
    }
    Some((value, mask))
}

/// Bytes `offset..offset + data.len()` of the dword `value` (the read side of [`merge_bytes`]); a width or
/// position [`merge_bytes`] refuses reads as all ones.
pub fn extract_bytes(value: u32, offset: usize, data: &mut [u8]) {
    if merge_bytes(offset, data).is_none() {
        data.fill(0xff);
        return;
    }
    for (i, b) in data.iter_mut().enumerate() {
        *b = (value >> ((offset + i) * 8)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x105b,
            revision: 1,
            class_code: 0x05_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn header_ids_are_read_only() {
        let mut c = PciConfiguration::new(id());
        assert_eq!(c.read_reg(0), 0x105b_1af4);
        c.write_reg(0, 0, &[0; 4]);
        assert_eq!(c.read_reg(0), 0x105b_1af4);
        assert_eq!(c.read_reg(2) >> 8, 0x05_80_00);
        assert_eq!(c.read_reg(2) & 0xff, 1);
        assert_eq!(c.read_reg(0x2c / 4), 0x0040_1af4);
        // Only the command bits we implement stick.
        c.write_reg(1, 0, &[0xff, 0xff]);
        assert_eq!(
            c.command(),
            COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
        assert_eq!(c.read_reg(CONFIG_SPACE_SIZE / 4), u32::MAX);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_keeps_type_bits() {
        let mut c = PciConfiguration::new(id());
        let spec = BarSpec {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        c.add_bar(0, spec, 0xc000_8000).unwrap();
        assert_eq!(c.read_reg(4), 0xc000_8000 | BAR_MEM_64);
        c.write_reg(4, 0, &[0xff; 4]);
        c.write_reg(5, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(4), 0xffff_8000 | BAR_MEM_64);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.enable_memory();
        assert_eq!(c.decoded_bar(0), None, "a BAR being sized decodes nothing");
        c.write_reg(4, 0, &0xd000_1234u32.to_le_bytes());
        c.write_reg(5, 0, &[0; 4]);
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        assert_eq!(c.decoded_bar(0), Some((0xd000_0000, 0x8000)));
        // Memory decoding off: no BAR decodes.
        c.write_reg(1, 0, &[0, 0]);
        assert_eq!(c.decoded_bar(0), None);
        // Unused BARs are hardwired to zero.
        c.write_reg(6, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(6), 0);
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut c = PciConfiguration::new(id());
        let bar = |size, is_64bit| BarSpec {
            size,
            is_64bit,
            prefetchable: false,
        };
        assert_eq!(
            c.add_bar(5, bar(0x1000, true), 0),
            Err(ConfigurationError::BarInUse(5))
        );
        assert_eq!(
            c.add_bar(0, bar(0x1001, false), 0),
            Err(ConfigurationError::BarSize(0x1001))
        );
        assert_eq!(
            c.add_bar(0, bar(0x1000, false), 0x800),
            Err(ConfigurationError::BarAddress(0x800))
        );
        c.add_bar(0, bar(0x1000, true), 0x1_0000_0000).unwrap();
        assert_eq!(
            c.add_bar(1, bar(0x1000, false), 0),
            Err(ConfigurationError::BarInUse(1))
        );
        c.add_bar(2, bar(0x1000, false), 0x2000).unwrap();
    }

    #[test]
    fn capability_list_is_chained_and_masked() {
        let mut c = PciConfiguration::new(id());
        let a = c.add_capability(&[0x09, 0xee, 4, 0], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 7, 7], &[0, 0, 0xff, 0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_ne!(c.read_reg(1) >> 16 & u32::from(STATUS_CAPABILITIES), 0);
        assert_eq!(c.read_reg(CAPABILITIES_POINTER / 4) & 0xff, 0x40);
        let mut cap = [0u8; 6];
        c.read_bytes(a, &mut cap[..4]);
        assert_eq!(cap[..4], [0x09, 0x44, 4, 0], "next pointer filled in");
        c.read_bytes(b, &mut cap);
        assert_eq!(cap, [0x11, 0, 0, 0, 7, 7]);
        // The id and next pointer cannot be changed; the writable byte can.
        c.write_reg(b / 4, 0, &[0xff; 4]);
        c.read_bytes(b, &mut cap[..4]);
        assert_eq!(cap[..4], [0x11, 0, 0xff, 0]);
        assert!(c.add_capability(&[0; 200], &[]).is_err());
    }

    #[test]
    fn access_widths_and_alignment() {
        assert_eq!(merge_bytes(2, &[1, 2]), Some((0x0201_0000, 0xffff_0000)));
        assert_eq!(merge_bytes(1, &[1, 2]), None);
        assert_eq!(merge_bytes(0, &[0; 8]), None);
        assert_eq!(merge_bytes(0, &[0; 3]), None);
        let mut b = [0u8; 2];
        extract_bytes(0x1234_5678, 2, &mut b);
        assert_eq!(b, [0x34, 0x12]);
        extract_bytes(0x1234_5678, 3, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
