//! The virtio-mmio register window (virtio 1.2, section 4.2.2), modern layout only: the one table the device
//! (`devices/src/virtio/mmio.rs`) and the test guest's driver both read, so they cannot drift apart.

/// "virt" little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (virtio 1.x) virtio-mmio.
pub const VERSION_MODERN: u32 = 2;

/// Register offsets from the start of the window.
pub mod reg {
    /// Magic value, reads [`MAGIC_VALUE`](super::MAGIC_VALUE).
    pub const MAGIC: u64 = 0x000;
    /// Transport version, reads [`VERSION_MODERN`](super::VERSION_MODERN).
    pub const VERSION: u64 = 0x004;
    /// Virtio device id (0 means no device).
    pub const DEVICE_ID: u64 = 0x008;
    /// Virtio subsystem vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// The 32 feature bits selected by `DEVICE_FEATURES_SEL` that the device offers.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32-bit word of device features `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// The 32 feature bits selected by `DRIVER_FEATURES_SEL` that the driver accepts.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32-bit word of driver features `DRIVER_FEATURES` writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the virtqueue the `QUEUE_*` registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest queue size the device supports for the selected queue (0: queue not available).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size the driver chose for the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready bit; the driver writes 1 once the queue is set up.
    pub const QUEUE_READY: u64 = 0x044;
    /// Driver writes a queue index here to notify the device of new buffers.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes (bit 0: used buffer, bit 1: configuration change).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Driver writes the causes it has handled, clearing them from `INTERRUPT_STATUS`.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ...); writing 0 resets the device.
    pub const STATUS: u64 = 0x070;
    /// Low 32 bits of the selected queue's descriptor table address.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// High 32 bits of the selected queue's descriptor table address.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Low 32 bits of the selected queue's driver (available) ring address.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// High 32 bits of the selected queue's driver (available) ring address.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Low 32 bits of the selected queue's device (used) ring address.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// High 32 bits of the selected queue's device (used) ring address.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Selects the shared memory region the `SHM_*` registers describe.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Low 32 bits of the selected shared memory region's length (all ones: no such region).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// High 32 bits of the selected shared memory region's length.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Low 32 bits of the selected shared memory region's guest physical address.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// High 32 bits of the selected shared memory region's guest physical address.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Changes whenever the device configuration space changes, so the driver can read it consistently.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device-specific configuration space starts here.
    pub const CONFIG: u64 = 0x100;
}
