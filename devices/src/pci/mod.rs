//! PCI: configuration space, the root bus with its host bridge, and MSI-X.
//!
//! - [`configuration`]: a function's configuration space ([`PciConfiguration`]): header, BARs with sizing,
//!   capability list, write masks.
//! - [`msix`]: the MSI-X table and pending bits ([`Msix`]) and the seam to the VMM's interrupt routing
//!   ([`MsiSink`]).
//! - [`root`]: bus 0 ([`PciRoot`]) and its faces on the buses: ECAM ([`PciEcam`]), the legacy 0xCF8/0xCFC
//!   ports ([`PciConfigIo`]) and the memory windows BARs decode in ([`PciMmioWindow`]).
//!
//! Devices (e.g. [`crate::virtio::pci::VirtioPciDevice`]) implement [`PciDevice`]. Everything a driver writes is
//! untrusted: a bad access is ignored or reads as all ones, never a panic.

pub mod configuration;
pub mod msix;
pub mod root;

pub use configuration::{BarSpec, PciConfiguration, PciIdentity};
pub use msix::{MsiMessage, MsiSink, Msix};
pub use root::{PciConfigIo, PciEcam, PciMmioWindow, PciRoot, PciRootError};

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// Its configuration space (BAR decoding is read from here).
    fn config(&self) -> &PciConfiguration;

    /// The dword at register index `reg` of the configuration space (all ones outside it).
    fn read_config(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// A driver write of `data` (1, 2 or 4 bytes) at byte `offset` of dword `reg`.
    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]);

    /// A read at `offset` into BAR `bar` (only called for an access that lies inside the BAR).
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A write at `offset` into BAR `bar` (only called for an access that lies inside the BAR).
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}
