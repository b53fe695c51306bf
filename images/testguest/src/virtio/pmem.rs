//! A polling virtio-pmem driver (virtio 1.x, section 5.19) over virtio-mmio.
//!
//! Config space: `start` (u64 at 0x100) and `size` (u64 at 0x108) of the guest physical window. One request
//! queue; a request is a 4-byte type (0 = flush) in a device-readable descriptor followed by a 4-byte status in a
//! device-writable descriptor (0 = success).

use super::mmio::{reg, status, Mmio, F_VERSION_1_HIGH};
use super::queue::{Desc, Queue, DESC_F_NEXT, DESC_F_WRITE, QUEUE_CAPACITY};
use crate::tsc::{relax, Deadline, CYCLES_PER_SECOND_MIN};

pub const REQ_TYPE_FLUSH: u32 = 0;
/// What the response word holds before the device writes it.
pub const RESP_SENTINEL: u32 = 0xdead_beef;
/// Waiting for a flush: the host runs fdatasync, which can take long on a busy disk.
pub const FLUSH_TIMEOUT_CYCLES: u64 = 60 * CYCLES_PER_SECOND_MIN;
/// Waiting for a status register change.
const REGISTER_TIMEOUT_CYCLES: u64 = 5 * CYCLES_PER_SECOND_MIN;
/// How often (in TSC cycles) a waiter reads the status register for DEVICE_NEEDS_RESET (each read is an exit).
const STATUS_POLL_CYCLES: u64 = 20_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// Status did not read back 0 after writing 0.
    ResetTimeout,
    /// The device does not offer VIRTIO_F_VERSION_1 (it is a legacy device).
    NoVersion1 { features_high: u32 },
    /// FEATURES_OK did not stick.
    FeaturesRejected { status: u32 },
    /// Queue 0 is already enabled after a reset.
    QueueAlreadyReady,
    /// Queue 0 does not exist (QueueNumMax 0).
    NoQueue,
    /// The config generation kept changing while reading start and size.
    ConfigUnstable,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            InitError::ResetTimeout => write!(f, "device status did not read 0 after reset"),
            InitError::NoVersion1 { features_high } => {
                write!(
                    f,
                    "VIRTIO_F_VERSION_1 not offered (features[63:32] = {features_high:#x})"
                )
            }
            InitError::FeaturesRejected { status } => {
                write!(f, "FEATURES_OK not accepted (status {status:#x})")
            }
            InitError::QueueAlreadyReady => write!(f, "queue 0 is ready right after a reset"),
            InitError::NoQueue => write!(f, "queue 0 has QueueNumMax 0"),
            InitError::ConfigUnstable => write!(f, "config generation kept changing"),
        }
    }
}

/// How a request ended, from the driver's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The device put the chain in the used ring. `stale` counts used entries for other heads skipped on the way.
    Used { len: u32, stale: u32 },
    /// The device set DEVICE_NEEDS_RESET instead of answering.
    NeedsReset,
    /// Nothing happened before the deadline.
    NoAnswer,
}

/// A flush's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushResult {
    Ok {
        cycles: u64,
    },
    /// Answered with a non-zero status (or the status word left unwritten: `RESP_SENTINEL`).
    Status(u32),
    NeedsReset,
    NoAnswer,
}

impl core::fmt::Display for FlushResult {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            FlushResult::Ok { .. } => write!(f, "ok"),
            FlushResult::Status(RESP_SENTINEL) => write!(f, "answered without writing a status"),
            FlushResult::Status(s) => write!(f, "status {s:#x}"),
            FlushResult::NeedsReset => write!(f, "device needs reset"),
            FlushResult::NoAnswer => write!(f, "no answer"),
        }
    }
}

pub struct PmemDevice {
    pub mmio: Mmio,
    pub queue: Queue,
    /// From the config space (valid after `init`).
    pub start: u64,
    pub size: u64,
}

impl PmemDevice {
    pub fn new(mmio: Mmio, queue: Queue) -> Self {
        PmemDevice {
            mmio,
            queue,
            start: 0,
            size: 0,
        }
    }

    pub fn status(&self) -> u32 {
        self.mmio.read(reg::STATUS)
    }

    fn set_status(&self, s: u32) {
        self.mmio.write(reg::STATUS, s);
    }

    /// Write 0 to the status and wait until it reads 0 (spec 4.2.3.1).
    pub fn reset(&mut self) -> Result<(), InitError> {
        self.set_status(0);
        let deadline = Deadline::after(REGISTER_TIMEOUT_CYCLES);
        while self.status() != 0 {
            if deadline.passed() {
                return Err(InitError::ResetTimeout);
            }
            relax();
        }
        Ok(())
    }

    /// Full initialisation: reset, negotiate VERSION_1 only, set up queue 0, read the config, DRIVER_OK.
    pub fn init(&mut self) -> Result<(), InitError> {
        self.init_until_queue_ready()?;
        self.go_live();
        Ok(())
    }

    /// Initialisation up to (not including) QueueReady and DRIVER_OK: the queue addresses are programmed.
    pub fn init_until_queue_ready(&mut self) -> Result<(), InitError> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);

        self.mmio.write(reg::DEVICE_FEATURES_SEL, 1);
        let features_high = self.mmio.read(reg::DEVICE_FEATURES);
        if features_high & F_VERSION_1_HIGH == 0 {
            self.set_status(status::FAILED);
            return Err(InitError::NoVersion1 { features_high });
        }
        // Accept VERSION_1 and nothing else: the driver needs no optional feature.
        self.mmio.write(reg::DRIVER_FEATURES_SEL, 0);
        self.mmio.write(reg::DRIVER_FEATURES, 0);
        self.mmio.write(reg::DRIVER_FEATURES_SEL, 1);
        self.mmio.write(reg::DRIVER_FEATURES, F_VERSION_1_HIGH);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let s = self.status();
        if s & status::FEATURES_OK == 0 {
            self.set_status(status::FAILED);
            return Err(InitError::FeaturesRejected { status: s });
        }

        self.mmio.write(reg::QUEUE_SEL, 0);
        if self.mmio.read(reg::QUEUE_READY) != 0 {
            self.set_status(status::FAILED);
            return Err(InitError::QueueAlreadyReady);
        }
        let max = self.mmio.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            self.set_status(status::FAILED);
            return Err(InitError::NoQueue);
        }
        let size = largest_power_of_two_at_most(max.min(QUEUE_CAPACITY as u32)) as u16;
        self.queue.reset(size);
        self.mmio.write(reg::QUEUE_NUM, size as u32);
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, self.queue.desc_addr()),
            (reg::QUEUE_DRIVER_LOW, self.queue.avail_addr()),
            (reg::QUEUE_DEVICE_LOW, self.queue.used_addr()),
        ] {
            self.mmio.write(low, addr as u32);
            self.mmio.write(low + 4, (addr >> 32) as u32);
        }

        let (start, size) = self.read_config()?;
        self.start = start;
        self.size = size;
        Ok(())
    }

    /// Enable queue 0 and set DRIVER_OK.
    pub fn go_live(&mut self) {
        self.mmio.write(reg::QUEUE_READY, 1);
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// `start` and `size`, read as 32-bit halves inside a stable config generation.
    fn read_config(&self) -> Result<(u64, u64), InitError> {
        for _ in 0..16 {
            let generation = self.mmio.read(reg::CONFIG_GENERATION);
            let word = |off: u64| self.mmio.read(reg::CONFIG + off) as u64;
            let start = word(0) | word(4) << 32;
            let size = word(8) | word(12) << 32;
            if self.mmio.read(reg::CONFIG_GENERATION) == generation {
                return Ok((start, size));
            }
        }
        Err(InitError::ConfigUnstable)
    }

    pub fn notify(&self) {
        self.mmio.write(reg::QUEUE_NOTIFY, 0);
    }

    /// Wait until the chain at `head` shows up in the used ring, the device asks for a reset, or `cycles` pass.
    pub fn wait_for(&mut self, head: u16, cycles: u64) -> Completion {
        let deadline = Deadline::after(cycles);
        let mut stale = 0;
        let mut next_status_check = Deadline::after(STATUS_POLL_CYCLES);
        loop {
            while let Some(elem) = self.queue.poll_used() {
                if elem.id == head as u32 {
                    return Completion::Used {
                        len: elem.len,
                        stale,
                    };
                }
                stale += 1;
            }
            if next_status_check.passed() {
                if self.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Completion::NeedsReset;
                }
                next_status_check = Deadline::after(STATUS_POLL_CYCLES);
            }
            if deadline.passed() {
                return Completion::NoAnswer;
            }
            relax();
        }
    }

    /// Flush with the two-descriptor chain at `head`, `head + 1` and buffer words `word`, `word + 1`.
    pub fn flush_at(&mut self, head: u16, word: usize, timeout_cycles: u64) -> FlushResult {
        let d = head as usize;
        self.queue.buf_write(word, REQ_TYPE_FLUSH);
        self.queue.buf_write(word + 1, RESP_SENTINEL);
        let req = self.queue.buf_addr(word);
        let resp = self.queue.buf_addr(word + 1);
        self.queue.set_desc(
            d,
            Desc {
                addr: req,
                len: 4,
                flags: DESC_F_NEXT,
                next: head + 1,
            },
        );
        self.queue.set_desc(
            d + 1,
            Desc {
                addr: resp,
                len: 4,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        let t0 = crate::tsc::rdtsc();
        self.queue.push_avail(head);
        self.notify();
        match self.wait_for(head, timeout_cycles) {
            Completion::Used { .. } => match self.queue.buf_read(word + 1) {
                0 => FlushResult::Ok {
                    cycles: crate::tsc::rdtsc() - t0,
                },
                s => FlushResult::Status(s),
            },
            Completion::NeedsReset => FlushResult::NeedsReset,
            Completion::NoAnswer => FlushResult::NoAnswer,
        }
    }

    /// A normal flush.
    pub fn flush(&mut self) -> FlushResult {
        self.flush_at(0, 0, FLUSH_TIMEOUT_CYCLES)
    }
}

fn largest_power_of_two_at_most(v: u32) -> u32 {
    if v == 0 {
        0
    } else {
        1 << (31 - v.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn queue_size_is_a_power_of_two() {
        use super::largest_power_of_two_at_most as p;
        assert_eq!(p(0), 0);
        assert_eq!(p(1), 1);
        assert_eq!(p(16), 16);
        assert_eq!(p(255), 128);
        assert_eq!(p(256), 256);
    }
}
