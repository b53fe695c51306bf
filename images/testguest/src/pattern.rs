//! The pattern the guest writes into pmem, defined so a host-side test can recompute it: the little-endian u64
//! at byte offset `off` (a multiple of 8) from the start of the region is
//! `PATTERN_TAG ^ ((seed as u64) << 32) ^ off`.

pub const PATTERN_TAG: u64 = 0xda85_0000_0000_0000;

pub fn word(seed: u32, offset: u64) -> u64 {
    PATTERN_TAG ^ ((seed as u64) << 32) ^ offset
}

#[cfg(test)]
mod tests {
    #[test]
    fn words_differ_by_offset_and_seed() {
        assert_eq!(super::word(0, 0), 0xda85_0000_0000_0000);
        assert_eq!(
            super::word(1, 8).to_le_bytes(),
            [8, 0, 0, 0, 1, 0, 0x85, 0xda]
        );
        assert_ne!(super::word(0, 8), super::word(0, 16));
    }
}
