//! Control messages on the control queues (`struct virtio_console_control { le32 id; le16 event; le16 value; }`,
//! virtio 1.2, 5.3.6.2), followed by a name for `PORT_NAME`.

/// Size of the fixed part of a control message.
pub const CONTROL_LEN: usize = 8;

/// Control events.
pub mod event {
    /// Driver to device: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device to driver: a port exists (`VIRTIO_CONSOLE_DEVICE_ADD`, "PORT_ADD").
    pub const PORT_ADD: u16 = 1;
    /// Device to driver: a port is gone.
    pub const PORT_REMOVE: u16 = 2;
    /// Driver to device: the driver set up the port (value 1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Device to driver: this port is a console.
    pub const CONSOLE_PORT: u16 = 4;
    /// Device to driver: console size changed.
    pub const RESIZE: u16 = 5;
    /// Both ways: the sender's end of the port is open (1) or closed (0).
    pub const PORT_OPEN: u16 = 6;
    /// Device to driver: the port's name follows the message.
    pub const PORT_NAME: u16 = 7;
}

/// One control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Port id.
    pub id: u32,
    /// One of [`event`].
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

impl Control {
    /// The message's bytes.
    pub fn to_bytes(self) -> [u8; CONTROL_LEN] {
        let mut b = [0u8; CONTROL_LEN];
        b[..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Reads a message from the start of `b`; `None` when `b` is too short.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; CONTROL_LEN] = b.get(..CONTROL_LEN)?.try_into().ok()?;
        Some(Control {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_short_input() {
        let c = Control {
            id: 1,
            event: event::PORT_OPEN,
            value: 1,
        };
        assert_eq!(c.to_bytes(), [1, 0, 0, 0, 6, 0, 1, 0]);
        assert_eq!(Control::parse(&c.to_bytes()), Some(c));
        assert_eq!(Control::parse(&[1, 0, 0]), None);
    }
}
