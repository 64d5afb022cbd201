//! The HVM guest's 16550 UART at 0x3f8 (COM1): enough of the register set
//! for a polling driver. Bytes written to THR become console output (the
//! kernel prints them with the domain's name); there is no input and no
//! UART interrupt. The line status follows the console's backlog
//! ([`Uart16550::tx_backlog`], set by the kernel): THRE clears while more
//! than [`TX_ROOM`] bytes wait (a polling driver waits, as for a real FIFO
//! that is full), TEMT while any byte waits (a guest that waits for it
//! before powering off loses none of its output).

/// First port of the emulated UART (COM1).
pub const COM1_BASE: u16 = 0x3f8;

const LCR_DLAB: u8 = 1 << 7;
const MCR_LOOPBACK: u8 = 1 << 4;
/// LSR: transmitter holding register empty.
const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty (nothing waits to be sent).
const LSR_TEMT: u8 = 0x40;
/// The backlog (bytes) above which THRE reads as clear.
pub const TX_ROOM: usize = 6144;
/// LSR: data ready (only in loopback mode, after a write).
const LSR_DR: u8 = 0x01;

/// Register state of one 16550.
#[derive(Clone, Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    /// Loopback: the last byte written, readable once from RBR.
    loopback: Option<u8>,
    /// Bytes written but not yet sent on (the kernel keeps this current).
    pub tx_backlog: usize,
}

impl Uart16550 {
    pub fn new() -> Self {
        Self::default()
    }

    /// A read of register `offset` (0..=7). Never fails.
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => self.loopback.take().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            // IIR: no interrupt pending; FIFOs enabled when FCR bit 0 was set.
            2 => 0x01 | if self.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                let thre = if self.tx_backlog <= TX_ROOM { LSR_THRE } else { 0 };
                let temt = if self.tx_backlog == 0 { LSR_TEMT } else { 0 };
                thre | temt | if self.loopback.is_some() { LSR_DR } else { 0 }
            }
            // MSR: in loopback the outputs come back as inputs; otherwise
            // carrier, data set ready and clear to send are up.
            6 if self.mcr & MCR_LOOPBACK != 0 => {
                let m = self.mcr;
                ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            6 => 0xb0,
            7 => self.scr,
            _ => 0xff,
        }
    }

    /// A write of `value` to register `offset` (0..=7). Returns the byte to
    /// print when it was a transmit (not in loopback mode).
    pub fn write(&mut self, offset: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 if self.mcr & MCR_LOOPBACK != 0 => self.loopback = Some(value),
            0 => return Some(value),
            1 if dlab => self.dlm = value,
            // Only the four defined interrupt-enable bits are kept.
            1 => self.ier = value & 0x0f,
            2 => self.fcr = value,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scr = value,
            // LSR and MSR are read-only: writes are ignored.
            _ => {}
        }
        None
    }

    /// The programmed divisor latch (115200 / divisor = baud rate).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn line_status_follows_the_backlog() {
        let mut u = Uart16550::new();
        assert_eq!(u.read(5) & 0x60, 0x60, "idle: THR and transmitter empty");
        u.tx_backlog = 10;
        assert_eq!(u.read(5) & 0x60, 0x20, "bytes waiting: room, not empty");
        u.tx_backlog = TX_ROOM + 1;
        assert_eq!(u.read(5) & 0x60, 0x00, "too many waiting: a polling driver waits");
        u.tx_backlog = 0;
        assert_eq!(u.read(5) & 0x60, 0x60);
    }
    use super::*;

    #[test]
    fn a_polling_driver_sees_an_idle_transmitter_and_its_bytes_come_out() {
        let mut u = Uart16550::new();
        // The usual init: IER off, DLAB, divisor 1, 8N1, FIFO, MCR.
        assert_eq!(u.write(1, 0x00), None);
        assert_eq!(u.write(3, 0x80), None);
        assert_eq!(u.write(0, 0x01), None);
        assert_eq!(u.write(1, 0x00), None);
        assert_eq!(u.write(3, 0x03), None);
        assert_eq!(u.write(2, 0xc7), None);
        assert_eq!(u.write(4, 0x0b), None);
        assert_eq!(u.divisor(), 1);
        assert_eq!(u.read(3), 0x03);
        assert_eq!(u.read(5) & 0x20, 0x20, "THR empty");
        assert_eq!(u.write(0, b'h'), Some(b'h'));
        assert_eq!(u.read(2), 0xc1, "no interrupt, FIFOs on");
    }

    #[test]
    fn divisor_latch_hides_thr_and_ier() {
        let mut u = Uart16550::new();
        u.write(1, 0x0f);
        u.write(3, 0x80);
        assert_eq!(u.write(0, 0x0c), None, "with DLAB a write to 0 sets DLL, prints nothing");
        u.write(1, 0x00);
        assert_eq!(u.divisor(), 0x0c);
        u.write(3, 0x03);
        assert_eq!(u.read(1), 0x0f, "IER kept across DLAB");
    }

    #[test]
    fn loopback_returns_the_byte_instead_of_printing_it() {
        let mut u = Uart16550::new();
        u.write(4, 0x1e);
        assert_eq!(u.write(0, 0xae), None);
        assert_eq!(u.read(5) & 1, 1);
        assert_eq!(u.read(0), 0xae);
        assert_eq!(u.read(5) & 1, 0);
    }

    #[test]
    fn any_register_and_value_is_safe() {
        let mut u = Uart16550::new();
        for off in 0..16u16 {
            for v in [0u8, 0x55, 0xaa, 0xff] {
                let _ = u.write(off, v);
                let _ = u.read(off);
            }
        }
        assert_eq!(u.read(8), 0xff);
    }
}
