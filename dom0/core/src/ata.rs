//! ATA (IDE) disks, driven by PIO and polled: the driver Dom0 uses when the
//! machine has no virtio-blk device (Bochs has none; its disks are ATA).
//!
//! Everything here goes through the [`Ports`] trait, so the protocol (task
//! file encoding, status decoding, IDENTIFY parsing, the bounded waits and
//! the recovery after an error) is host-tested against a model device. Dom0's
//! kernel implements [`Ports`] with `in`/`out` on the ports microhv opens to
//! it; that is all that is left to it.
//!
//! What the driver promises: no wait is unbounded (each one ends after a
//! time limit, and after a number of polls in case the clock stands still);
//! a request outside the disk or outside LBA28 is refused before anything
//! reaches the device; after any error or timeout the channel is reset
//! (SRST), so a device left half-way through a command cannot wedge the next
//! one. The device's interrupt is disabled (nIEN) and never used.
//!
//! Only what Dom0 needs: LBA28 (128 GiB), READ SECTORS, WRITE SECTORS,
//! FLUSH CACHE, IDENTIFY DEVICE; one sector per DRQ block.

use crate::blkback::SyncDisk;
use core::fmt;
use shared_abi::Errno;

/// Command block of the primary channel.
pub const PRIMARY_IO: u16 = 0x1f0;
/// Device control (write) / alternate status (read) of the primary channel.
pub const PRIMARY_CONTROL: u16 = 0x3f6;

/// Register offsets from the command block base.
pub const REG_DATA: u16 = 0;
/// Read: error register. Write: features.
pub const REG_ERROR: u16 = 1;
pub const REG_FEATURES: u16 = 1;
pub const REG_SECTOR_COUNT: u16 = 2;
pub const REG_LBA_LOW: u16 = 3;
pub const REG_LBA_MID: u16 = 4;
pub const REG_LBA_HIGH: u16 = 5;
pub const REG_DEVICE: u16 = 6;
/// Read: status. Write: command.
pub const REG_STATUS: u16 = 7;
pub const REG_COMMAND: u16 = 7;

/// Status bits.
pub const ST_ERR: u8 = 0x01;
pub const ST_DRQ: u8 = 0x08;
pub const ST_DF: u8 = 0x20;
pub const ST_DRDY: u8 = 0x40;
pub const ST_BSY: u8 = 0x80;

/// Device control bits.
pub const CTL_NIEN: u8 = 0x02;
pub const CTL_SRST: u8 = 0x04;

pub const CMD_READ_SECTORS: u8 = 0x20;
pub const CMD_WRITE_SECTORS: u8 = 0x30;
pub const CMD_FLUSH_CACHE: u8 = 0xe7;
pub const CMD_IDENTIFY: u8 = 0xec;

pub const SECTOR_SIZE: usize = 512;
const _: () = assert!(SECTOR_SIZE.is_power_of_two());
/// LBA28 addresses this many sectors.
pub const LBA28_SECTORS: u64 = 1 << 28;
/// One READ/WRITE SECTORS moves at most this many (count register 0 = 256).
pub const MAX_SECTORS_PER_COMMAND: u64 = 256;

/// Default bound of each wait (guest time).
pub const DEFAULT_TIMEOUT_NS: u64 = 500_000_000;
/// Default bound of each wait in status reads, whatever the clock says.
pub const DEFAULT_MAX_POLLS: u32 = 5_000_000;

/// Which device of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    Master,
    Slave,
}

impl Drive {
    pub fn name(self) -> &'static str {
        match self {
            Drive::Master => "master",
            Drive::Slave => "slave",
        }
    }

    /// The device register for a command at `lba`: bits 7 and 5 set (obsolete,
    /// set by convention), bit 6 LBA addressing, bit 4 the device, bits 3..0
    /// LBA bits 27..24.
    pub fn device_register(self, lba: u64) -> u8 {
        let dev = match self {
            Drive::Master => 0,
            Drive::Slave => 0x10,
        };
        0xe0 | dev | ((lba >> 24) & 0x0f) as u8
    }
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtaError {
    /// Nothing answers there (status 0x00, or 0xff from a floating bus).
    NoDevice,
    /// A device that is not an ATA disk (the ATAPI or SATA signature in the
    /// LBA mid/high registers after IDENTIFY, or IDENTIFY data saying so).
    NotAta { signature: u16 },
    /// An ATA disk without LBA, or with no LBA28 sectors.
    Unusable,
    /// A request outside the disk or LBA28, a sector count of 0 or over 256,
    /// or a buffer that is not whole sectors.
    OutOfRange,
    /// The device set ERR; `error` is its error register.
    Device { status: u8, error: u8 },
    /// The device set DF (device fault).
    Fault { status: u8 },
    /// The device did not follow the protocol (no DRQ where data was due, or
    /// DRQ after the last sector).
    Protocol { status: u8 },
    /// A wait ran out with the device still busy.
    Timeout { status: u8 },
}

impl fmt::Display for AtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AtaError::NoDevice => write!(f, "no device"),
            AtaError::NotAta { signature } => write!(f, "not an ATA disk (signature {signature:#06x})"),
            AtaError::Unusable => write!(f, "an ATA disk without LBA28 sectors"),
            AtaError::OutOfRange => write!(f, "request outside the disk"),
            AtaError::Device { status, error } => write!(f, "device error (status {status:#04x}, error {error:#04x})"),
            AtaError::Fault { status } => write!(f, "device fault (status {status:#04x})"),
            AtaError::Protocol { status } => write!(f, "protocol error (status {status:#04x})"),
            AtaError::Timeout { status } => write!(f, "timed out (status {status:#04x})"),
        }
    }
}

impl From<AtaError> for Errno {
    fn from(e: AtaError) -> Errno {
        match e {
            AtaError::OutOfRange => Errno::EINVAL,
            AtaError::Timeout { .. } => Errno::ETIMEDOUT,
            _ => Errno::EIO,
        }
    }
}

/// What a status byte says, most important first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 0xff: no device drives the bus.
    Floating,
    /// BSY: the other bits mean nothing yet.
    Busy,
    Error,
    Fault,
    /// DRQ: a sector of data is to be moved.
    Data,
    /// Neither busy nor asking for data.
    Idle,
}

impl Status {
    pub fn decode(status: u8) -> Status {
        if status == 0xff {
            Status::Floating
        } else if status & ST_BSY != 0 {
            Status::Busy
        } else if status & ST_ERR != 0 {
            Status::Error
        } else if status & ST_DF != 0 {
            Status::Fault
        } else if status & ST_DRQ != 0 {
            Status::Data
        } else {
            Status::Idle
        }
    }
}

/// The registers of one command, written after the device register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskFile {
    pub device: u8,
    pub sector_count: u8,
    pub lba_low: u8,
    pub lba_mid: u8,
    pub lba_high: u8,
    pub command: u8,
}

impl TaskFile {
    /// READ or WRITE SECTORS of `count` sectors at `lba` on a disk of
    /// `capacity` sectors; refused unless 1 <= count <= 256 and the whole
    /// range is inside both the disk and LBA28.
    pub fn rw(command: u8, drive: Drive, lba: u64, count: u64, capacity: u64) -> Result<TaskFile, AtaError> {
        if count == 0 || count > MAX_SECTORS_PER_COMMAND {
            return Err(AtaError::OutOfRange);
        }
        let end = lba.checked_add(count).ok_or(AtaError::OutOfRange)?;
        if end > capacity || end > LBA28_SECTORS {
            return Err(AtaError::OutOfRange);
        }
        Ok(TaskFile {
            device: drive.device_register(lba),
            // 256 is written as 0.
            sector_count: (count & 0xff) as u8,
            lba_low: lba as u8,
            lba_mid: (lba >> 8) as u8,
            lba_high: (lba >> 16) as u8,
            command,
        })
    }

    /// A command without an address or data phase (IDENTIFY, FLUSH CACHE).
    pub fn plain(command: u8, drive: Drive) -> TaskFile {
        TaskFile { device: drive.device_register(0), sector_count: 0, lba_low: 0, lba_mid: 0, lba_high: 0, command }
    }

    /// (register offset, value) after the device register, command last.
    pub fn writes(&self) -> [(u16, u8); 6] {
        [
            (REG_FEATURES, 0),
            (REG_SECTOR_COUNT, self.sector_count),
            (REG_LBA_LOW, self.lba_low),
            (REG_LBA_MID, self.lba_mid),
            (REG_LBA_HIGH, self.lba_high),
            (REG_COMMAND, self.command),
        ]
    }
}

/// What IDENTIFY DEVICE told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Sectors addressable with LBA28 (words 60-61).
    pub sectors: u64,
    /// Model number (words 27-46), ASCII, trailing spaces removed.
    model: [u8; 40],
    model_len: usize,
}

impl Identity {
    /// Parses the 256 words of IDENTIFY DEVICE data.
    pub fn parse(words: &[u16; 256]) -> Result<Identity, AtaError> {
        // Word 0 bit 15 set: not an ATA device (ATAPI says 10b in 15..14).
        if words[0] & 0x8000 != 0 {
            return Err(AtaError::NotAta { signature: 0 });
        }
        // Word 49 bit 9: LBA supported.
        if words[49] & (1 << 9) == 0 {
            return Err(AtaError::Unusable);
        }
        let sectors = u64::from(words[60]) | (u64::from(words[61]) << 16);
        if sectors == 0 {
            return Err(AtaError::Unusable);
        }
        let mut model = [0u8; 40];
        // Each word holds two characters, the first in the high byte.
        for (i, w) in words[27..47].iter().enumerate() {
            model[2 * i] = (w >> 8) as u8;
            model[2 * i + 1] = *w as u8;
        }
        for b in model.iter_mut() {
            if !(0x20..0x7f).contains(b) {
                *b = b'?';
            }
        }
        let model_len = model.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
        Ok(Identity { sectors, model, model_len })
    }

    pub fn model(&self) -> &str {
        core::str::from_utf8(&self.model[..self.model_len]).unwrap_or("?")
    }
}

/// Port I/O as the driver needs it; the kernel's implementation is `in`
/// and `out`, the tests' a model device.
pub trait Ports {
    fn read8(&mut self, port: u16) -> u8;
    fn write8(&mut self, port: u16, value: u8);
    /// Reads 256 16-bit words from the data port into `buf` (512 bytes,
    /// each word little-endian).
    fn read_sector(&mut self, port: u16, buf: &mut [u8]);
    /// Writes `buf` (512 bytes) as 256 16-bit words to the data port.
    fn write_sector(&mut self, port: u16, buf: &[u8]);
    /// A clock for the bounded waits (nanoseconds from any start).
    fn now_ns(&mut self) -> u64;
}

/// One ATA disk on a channel, found by [`AtaDisk::probe`].
pub struct AtaDisk<P: Ports> {
    ports: P,
    io: u16,
    control: u16,
    drive: Drive,
    identity: Identity,
    timeout_ns: u64,
    max_polls: u32,
    /// Channel resets done after errors.
    pub resets: u32,
}

/// The bits of a channel the waits need, without the identity.
struct Chan<'a, P: Ports> {
    ports: &'a mut P,
    io: u16,
    control: u16,
    timeout_ns: u64,
    max_polls: u32,
}

impl<P: Ports> Chan<'_, P> {
    /// About 400 ns for the device to put its status on the bus after a
    /// device-register write: four reads of the alternate status.
    fn settle(&mut self) {
        for _ in 0..4 {
            self.ports.read8(self.control);
        }
    }

    /// Polls the status register until BSY clears; bounded.
    fn wait_not_busy(&mut self) -> Result<u8, AtaError> {
        let start = self.ports.now_ns();
        let mut polls = 0u32;
        loop {
            let st = self.ports.read8(self.io + REG_STATUS);
            match Status::decode(st) {
                Status::Floating => return Err(AtaError::NoDevice),
                Status::Busy => {}
                _ => return Ok(st),
            }
            polls += 1;
            if polls >= self.max_polls || self.ports.now_ns().wrapping_sub(start) > self.timeout_ns {
                return Err(AtaError::Timeout { status: st });
            }
        }
    }

    fn check(&mut self, st: u8) -> Result<Status, AtaError> {
        match Status::decode(st) {
            Status::Error => Err(AtaError::Device { status: st, error: self.ports.read8(self.io + REG_ERROR) }),
            Status::Fault => Err(AtaError::Fault { status: st }),
            s => Ok(s),
        }
    }

    /// Waits for the device to ask for a sector of data.
    fn wait_data(&mut self) -> Result<(), AtaError> {
        let st = self.wait_not_busy()?;
        match self.check(st)? {
            Status::Data => Ok(()),
            _ => Err(AtaError::Protocol { status: st }),
        }
    }

    /// Waits for the end of a command, with no data left to move.
    fn wait_done(&mut self) -> Result<(), AtaError> {
        let st = self.wait_not_busy()?;
        match self.check(st)? {
            Status::Idle => Ok(()),
            _ => Err(AtaError::Protocol { status: st }),
        }
    }

    /// Selects the device and writes the command.
    fn issue(&mut self, tf: &TaskFile) -> Result<(), AtaError> {
        // The device register may only change while the channel is not busy.
        self.wait_not_busy()?;
        self.ports.write8(self.io + REG_DEVICE, tf.device);
        self.settle();
        self.wait_not_busy()?;
        for (reg, v) in tf.writes() {
            self.ports.write8(self.io + reg, v);
        }
        // Status is valid 400 ns after a command (BSY may not be up yet).
        self.settle();
        Ok(())
    }

    /// Software reset of both devices on the channel (SRST for at least
    /// 5 us), leaving the interrupt disabled.
    fn reset(&mut self) {
        self.ports.write8(self.control, CTL_SRST | CTL_NIEN);
        let start = self.ports.now_ns();
        for _ in 0..1000 {
            self.ports.read8(self.control);
            if self.ports.now_ns().wrapping_sub(start) >= 5_000 {
                break;
            }
        }
        self.ports.write8(self.control, CTL_NIEN);
        self.settle();
        let _ = self.wait_not_busy();
    }
}

impl<P: Ports> AtaDisk<P> {
    fn chan(&mut self) -> Chan<'_, P> {
        Chan { ports: &mut self.ports, io: self.io, control: self.control, timeout_ns: self.timeout_ns, max_polls: self.max_polls }
    }

    /// Looks for an ATA disk at `drive` of the channel at `io`/`control`:
    /// disables the channel's interrupt, sends IDENTIFY DEVICE and reads the
    /// disk's size. Every wait is bounded by `timeout_ns` and `max_polls`.
    pub fn probe(mut ports: P, io: u16, control: u16, drive: Drive, timeout_ns: u64, max_polls: u32) -> Result<AtaDisk<P>, AtaError> {
        let mut ch = Chan { ports: &mut ports, io, control, timeout_ns, max_polls };
        let r = identify(&mut ch, drive);
        if matches!(r, Err(AtaError::Timeout { .. } | AtaError::Protocol { .. } | AtaError::Device { .. } | AtaError::Fault { .. })) {
            ch.reset();
        }
        let identity = r?;
        Ok(AtaDisk { ports, io, control, drive, identity, timeout_ns, max_polls, resets: 0 })
    }

    pub fn drive(&self) -> Drive {
        self.drive
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sectors of the disk (LBA28).
    pub fn sectors(&self) -> u64 {
        self.identity.sectors
    }

    /// Reads `buf.len() / 512` sectors from `lba`.
    pub fn read_sectors(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        self.transfer(CMD_READ_SECTORS, lba, buf.len(), |ch, i| ch.ports.read_sector(ch.io + REG_DATA, &mut buf[i * SECTOR_SIZE..][..SECTOR_SIZE]))
    }

    /// Writes `data.len() / 512` sectors at `lba`.
    pub fn write_sectors(&mut self, lba: u64, data: &[u8]) -> Result<(), AtaError> {
        self.transfer(CMD_WRITE_SECTORS, lba, data.len(), |ch, i| ch.ports.write_sector(ch.io + REG_DATA, &data[i * SECTOR_SIZE..][..SECTOR_SIZE]))
    }

    /// A PIO data command over `len` bytes from `lba`, in commands of at
    /// most [`MAX_SECTORS_PER_COMMAND`] sectors: `sector(ch, i)` moves
    /// sector `i` (counted from `lba`) when the device asks for it.
    fn transfer(&mut self, cmd: u8, lba: u64, len: usize, mut sector: impl FnMut(&mut Chan<'_, P>, usize)) -> Result<(), AtaError> {
        self.check_range(lba, len)?;
        let total = len / SECTOR_SIZE;
        let mut first = 0;
        while first < total {
            let n = (total - first).min(MAX_SECTORS_PER_COMMAND as usize);
            let tf = TaskFile::rw(cmd, self.drive, lba + first as u64, n as u64, self.sectors())?;
            self.command(&tf, |ch| {
                for i in first..first + n {
                    ch.wait_data()?;
                    sector(ch, i);
                    // 400 ns before the status of the next sector is valid.
                    ch.settle();
                }
                ch.wait_done()
            })?;
            first += n;
        }
        Ok(())
    }

    /// FLUSH CACHE: everything written so far is on the medium.
    pub fn flush(&mut self) -> Result<(), AtaError> {
        let tf = TaskFile::plain(CMD_FLUSH_CACHE, self.drive);
        self.command(&tf, |ch| ch.wait_done())
    }

    fn check_range(&self, lba: u64, len: usize) -> Result<(), AtaError> {
        if len == 0 || len & (SECTOR_SIZE - 1) != 0 {
            return Err(AtaError::OutOfRange);
        }
        let end = lba.checked_add((len / SECTOR_SIZE) as u64).ok_or(AtaError::OutOfRange)?;
        if end > self.sectors() {
            return Err(AtaError::OutOfRange);
        }
        Ok(())
    }

    /// Issues `tf`, runs its data phase; resets the channel after any error.
    fn command(&mut self, tf: &TaskFile, phase: impl FnOnce(&mut Chan<'_, P>) -> Result<(), AtaError>) -> Result<(), AtaError> {
        let mut ch = self.chan();
        let r = ch.issue(tf).and_then(|()| phase(&mut ch));
        if r.is_err() {
            ch.reset();
            self.resets += 1;
        }
        r
    }
}

fn identify<P: Ports>(ch: &mut Chan<'_, P>, drive: Drive) -> Result<Identity, AtaError> {
    ch.ports.write8(ch.control, CTL_NIEN);
    // The device register may only change while the channel is not busy.
    ch.wait_not_busy()?;
    ch.ports.write8(ch.io + REG_DEVICE, drive.device_register(0));
    ch.settle();
    // Nothing there: the bus floats (0xff), or the other device answers for
    // an absent one with 0.
    let st = ch.ports.read8(ch.io + REG_STATUS);
    if st == 0 || st == 0xff {
        return Err(AtaError::NoDevice);
    }
    ch.wait_not_busy()?;
    for (reg, v) in TaskFile::plain(CMD_IDENTIFY, drive).writes() {
        ch.ports.write8(ch.io + reg, v);
    }
    ch.settle();
    if ch.ports.read8(ch.io + REG_STATUS) == 0 {
        return Err(AtaError::NoDevice);
    }
    let st = ch.wait_not_busy()?;
    // A packet (ATAPI) or SATA device aborts IDENTIFY DEVICE and leaves its
    // signature in LBA mid/high.
    let signature = u16::from(ch.ports.read8(ch.io + REG_LBA_MID)) | (u16::from(ch.ports.read8(ch.io + REG_LBA_HIGH)) << 8);
    if signature != 0 {
        return Err(AtaError::NotAta { signature });
    }
    ch.check(st)?;
    if Status::decode(st) != Status::Data {
        return Err(AtaError::Protocol { status: st });
    }
    let mut bytes = [0u8; SECTOR_SIZE];
    ch.ports.read_sector(ch.io + REG_DATA, &mut bytes);
    let mut words = [0u16; 256];
    for (w, b) in words.iter_mut().zip(bytes.chunks_exact(2)) {
        *w = u16::from_le_bytes([b[0], b[1]]);
    }
    Identity::parse(&words)
}

impl<P: Ports> SyncDisk for AtaDisk<P> {
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Errno> {
        Ok(self.read_sectors(sector, buf)?)
    }
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), Errno> {
        Ok(self.write_sectors(sector, data)?)
    }
    fn flush(&mut self) -> Result<(), Errno> {
        Ok(AtaDisk::flush(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IO: u16 = PRIMARY_IO;
    const CTL: u16 = PRIMARY_CONTROL;
    const ABRT: u8 = 0x04;
    const UNC: u8 = 0x40;
    const IDNF: u8 = 0x10;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Phase {
        None,
        Identify,
        Read { lba: u64, left: u64 },
        Write { lba: u64, left: u64 },
    }

    /// A model of one channel: a disk at `at` (or nothing), nothing at the
    /// other position, and knobs to make it misbehave.
    struct Model {
        at: Drive,
        present: bool,
        atapi: bool,
        lba: bool,
        disk: Vec<u8>,
        selected: Drive,
        regs: [u8; 8],
        status: u8,
        error: u8,
        control: u8,
        phase: Phase,
        /// Status reads that still show BSY.
        busy: u64,
        /// Status reads that show BSY after each command or sector.
        latency: u64,
        /// BSY forever after the next command (until a reset).
        stuck: bool,
        /// This command is aborted.
        abort: Option<u8>,
        /// Reading or writing this sector fails (UNC).
        bad_sector: Option<u64>,
        clock: u64,
        status_reads: u64,
        commands: Vec<(u8, u64, u64)>,
        resets: u32,
    }

    fn model(at: Drive, sectors: u64) -> Model {
        Model {
            at,
            present: true,
            atapi: false,
            lba: true,
            disk: (0..sectors as usize * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8 ^ (i as u8)).collect(),
            selected: Drive::Master,
            regs: [0; 8],
            status: ST_DRDY,
            error: 0,
            control: 0,
            phase: Phase::None,
            busy: 2,
            latency: 3,
            stuck: false,
            abort: None,
            bad_sector: None,
            clock: 0,
            status_reads: 0,
            commands: Vec::new(),
            resets: 0,
        }
    }

    impl Model {
        fn here(&self) -> bool {
            self.present && self.selected == self.at
        }
        fn sectors(&self) -> u64 {
            (self.disk.len() / SECTOR_SIZE) as u64
        }
        fn status_now(&self) -> u8 {
            if !self.here() {
                0
            } else if self.busy > 0 {
                ST_BSY
            } else {
                self.status
            }
        }
        fn abort(&mut self, error: u8) {
            self.status = ST_DRDY | ST_ERR;
            self.error = error;
            self.phase = Phase::None;
        }
        fn identify_data(&self) -> [u8; SECTOR_SIZE] {
            let mut w = [0u16; 256];
            w[0] = 0x0040;
            if self.lba {
                w[49] = 1 << 9;
            }
            w[60] = self.sectors() as u16;
            w[61] = (self.sectors() >> 16) as u16;
            for (i, pair) in b"MODEL HARDDISK                          ".chunks(2).enumerate() {
                w[27 + i] = (u16::from(pair[0]) << 8) | u16::from(pair[1]);
            }
            let mut b = [0u8; SECTOR_SIZE];
            for (i, x) in w.iter().enumerate() {
                b[2 * i..2 * i + 2].copy_from_slice(&x.to_le_bytes());
            }
            b
        }
        fn command(&mut self, cmd: u8) {
            let lba = u64::from(self.regs[3]) | (u64::from(self.regs[4]) << 8) | (u64::from(self.regs[5]) << 16) | (u64::from(self.regs[6] & 0xf) << 24);
            let count = if self.regs[2] == 0 { 256 } else { u64::from(self.regs[2]) };
            self.commands.push((cmd, lba, count));
            self.error = 0;
            self.busy = if self.stuck { u64::MAX } else { self.latency };
            if self.abort == Some(cmd) {
                return self.abort(ABRT);
            }
            match cmd {
                CMD_IDENTIFY if self.atapi => {
                    self.regs[4] = 0x14;
                    self.regs[5] = 0xeb;
                    self.abort(ABRT);
                }
                CMD_IDENTIFY => {
                    self.phase = Phase::Identify;
                    self.status = ST_DRDY | ST_DRQ;
                }
                CMD_READ_SECTORS | CMD_WRITE_SECTORS => {
                    if self.regs[6] & 0x40 == 0 {
                        return self.abort(ABRT);
                    }
                    if lba + count > self.sectors() {
                        return self.abort(IDNF);
                    }
                    self.phase = if cmd == CMD_READ_SECTORS { Phase::Read { lba, left: count } } else { Phase::Write { lba, left: count } };
                    self.status = ST_DRDY | ST_DRQ;
                }
                CMD_FLUSH_CACHE => self.status = ST_DRDY,
                _ => self.abort(ABRT),
            }
        }
        /// After one sector of a read or write.
        fn next(&mut self, lba: u64, left: u64, write: bool) {
            if left == 1 {
                self.phase = Phase::None;
                self.status = ST_DRDY;
            } else {
                self.phase = if write { Phase::Write { lba: lba + 1, left: left - 1 } } else { Phase::Read { lba: lba + 1, left: left - 1 } };
            }
            self.busy = self.latency;
        }
    }

    impl Ports for Model {
        fn read8(&mut self, port: u16) -> u8 {
            match port {
                CTL => self.status_now(),
                p if p == IO + REG_STATUS => {
                    self.status_reads += 1;
                    let s = self.status_now();
                    if self.here() && self.busy > 0 && self.busy != u64::MAX {
                        self.busy -= 1;
                    }
                    s
                }
                p if p == IO + REG_ERROR => self.error,
                p if (IO + 2..IO + 7).contains(&p) => self.regs[(p - IO) as usize],
                _ => panic!("read of port {port:#x}"),
            }
        }
        fn write8(&mut self, port: u16, value: u8) {
            match port {
                CTL => {
                    if value & CTL_SRST != 0 && self.control & CTL_SRST == 0 {
                        self.resets += 1;
                        self.phase = Phase::None;
                        self.busy = 1;
                        self.stuck = false;
                        self.status = ST_DRDY;
                        self.error = 0;
                    }
                    self.control = value;
                }
                p if p == IO + REG_DEVICE => {
                    assert!(self.busy == 0 || !self.here(), "device register written while busy");
                    self.selected = if value & 0x10 != 0 { Drive::Slave } else { Drive::Master };
                    self.regs[6] = value;
                }
                p if p == IO + REG_COMMAND => {
                    if self.here() {
                        assert_eq!(self.busy, 0, "command written while busy");
                        self.command(value);
                    }
                }
                p if (IO + 1..IO + 6).contains(&p) => self.regs[(p - IO) as usize] = value,
                _ => panic!("write of port {port:#x}"),
            }
        }
        fn read_sector(&mut self, port: u16, buf: &mut [u8]) {
            assert_eq!(port, IO);
            assert_eq!(buf.len(), SECTOR_SIZE);
            assert!(self.busy == 0 && self.status & ST_DRQ != 0, "data read without DRQ");
            match self.phase {
                Phase::Identify => {
                    buf.copy_from_slice(&self.identify_data());
                    self.phase = Phase::None;
                    self.status = ST_DRDY;
                }
                Phase::Read { lba, left } => {
                    if self.bad_sector == Some(lba) {
                        return self.abort(UNC | ABRT);
                    }
                    let at = lba as usize * SECTOR_SIZE;
                    buf.copy_from_slice(&self.disk[at..at + SECTOR_SIZE]);
                    self.next(lba, left, false);
                }
                p => panic!("data read in phase {p:?}"),
            }
        }
        fn write_sector(&mut self, port: u16, buf: &[u8]) {
            assert_eq!(port, IO);
            assert_eq!(buf.len(), SECTOR_SIZE);
            assert!(self.busy == 0 && self.status & ST_DRQ != 0, "data write without DRQ");
            let Phase::Write { lba, left } = self.phase else { panic!("data write in phase {:?}", self.phase) };
            if self.bad_sector == Some(lba) {
                return self.abort(UNC | ABRT);
            }
            let at = lba as usize * SECTOR_SIZE;
            self.disk[at..at + SECTOR_SIZE].copy_from_slice(buf);
            self.next(lba, left, true);
        }
        fn now_ns(&mut self) -> u64 {
            self.clock += 1_000;
            self.clock
        }
    }

    fn probe(m: Model) -> Result<AtaDisk<Model>, AtaError> {
        AtaDisk::probe(m, IO, CTL, Drive::Slave, 1_000_000, 100_000)
    }

    #[test]
    fn the_device_register_selects_the_slave_in_lba_mode() {
        assert_eq!(Drive::Slave.device_register(0), 0xf0);
        assert_eq!(Drive::Master.device_register(0), 0xe0);
        assert_eq!(Drive::Slave.device_register(0x0abc_def1), 0xfa);
        // Only bits 27..24 of the LBA reach the register.
        assert_eq!(Drive::Slave.device_register(0xffff_ffff), 0xff);
    }

    #[test]
    fn task_files_encode_lba28_and_the_sector_count() {
        let tf = TaskFile::rw(CMD_READ_SECTORS, Drive::Slave, 0x0123_4567, 256, LBA28_SECTORS).unwrap();
        assert_eq!(tf, TaskFile { device: 0xf1, sector_count: 0, lba_low: 0x67, lba_mid: 0x45, lba_high: 0x23, command: 0x20 });
        assert_eq!(tf.writes()[5], (REG_COMMAND, CMD_READ_SECTORS), "the command goes last");
        let tf = TaskFile::rw(CMD_WRITE_SECTORS, Drive::Slave, 2048, 64, 64512).unwrap();
        assert_eq!((tf.sector_count, tf.lba_low, tf.lba_mid, tf.lba_high, tf.device), (64, 0x00, 0x08, 0x00, 0xf0));
        // The last sector of the disk is fine, one more is not.
        assert!(TaskFile::rw(CMD_READ_SECTORS, Drive::Slave, 64511, 1, 64512).is_ok());
        for (lba, count, cap) in [
            (0, 0, 100),
            (0, 257, 1000),
            (64512, 1, 64512),
            (64500, 13, 64512),
            (LBA28_SECTORS - 1, 2, u64::MAX),
            (u64::MAX, 1, u64::MAX),
        ] {
            assert_eq!(TaskFile::rw(CMD_READ_SECTORS, Drive::Slave, lba, count, cap), Err(AtaError::OutOfRange), "{lba} {count} {cap}");
        }
    }

    #[test]
    fn status_bytes_decode_in_order_of_importance() {
        assert_eq!(Status::decode(0xff), Status::Floating);
        assert_eq!(Status::decode(ST_BSY | ST_ERR | ST_DRQ), Status::Busy);
        assert_eq!(Status::decode(ST_DRDY | ST_ERR | ST_DRQ), Status::Error);
        assert_eq!(Status::decode(ST_DRDY | ST_DF), Status::Fault);
        assert_eq!(Status::decode(ST_DRDY | ST_DRQ), Status::Data);
        assert_eq!(Status::decode(ST_DRDY), Status::Idle);
        assert_eq!(Status::decode(0), Status::Idle);
    }

    #[test]
    fn identify_data_gives_lba28_sectors_and_the_model() {
        let m = model(Drive::Slave, 64512);
        let bytes = m.identify_data();
        let mut w = [0u16; 256];
        for (i, x) in w.iter_mut().enumerate() {
            *x = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        }
        let id = Identity::parse(&w).unwrap();
        assert_eq!(id.sectors, 64512);
        assert_eq!(id.model(), "MODEL HARDDISK");
        w[61] = 0x0fff;
        assert_eq!(Identity::parse(&w).unwrap().sectors, (0x0fff << 16) | 64512);
        let mut atapi = w;
        atapi[0] = 0x85c0;
        assert!(matches!(Identity::parse(&atapi), Err(AtaError::NotAta { .. })));
        let mut no_lba = w;
        no_lba[49] = 0;
        assert_eq!(Identity::parse(&no_lba), Err(AtaError::Unusable));
        let mut empty = w;
        empty[60] = 0;
        empty[61] = 0;
        assert_eq!(Identity::parse(&empty), Err(AtaError::Unusable));
    }

    #[test]
    fn probe_finds_the_slave_and_disables_its_interrupt() {
        let d = probe(model(Drive::Slave, 64512)).unwrap();
        assert_eq!(d.sectors(), 64512);
        assert_eq!(d.identity().model(), "MODEL HARDDISK");
        assert_eq!(d.ports.control & CTL_NIEN, CTL_NIEN, "nIEN set");
        assert_eq!(d.ports.commands, vec![(CMD_IDENTIFY, 0, 256)]);
        assert_eq!(d.ports.regs[6], 0xf0);
    }

    #[test]
    fn probe_reports_what_is_not_a_usable_disk_without_waiting_long() {
        // Nothing at the slave position (the CD-ROM alone, as in QEMU).
        let mut m = model(Drive::Master, 100);
        m.present = false;
        assert_eq!(probe(m).err(), Some(AtaError::NoDevice));
        let m = model(Drive::Master, 100);
        assert_eq!(probe(m).err(), Some(AtaError::NoDevice), "a disk at the master position is not ours");
        let mut m = model(Drive::Slave, 100);
        m.atapi = true;
        assert_eq!(probe(m).err(), Some(AtaError::NotAta { signature: 0xeb14 }));
        let mut m = model(Drive::Slave, 100);
        m.lba = false;
        assert_eq!(probe(m).err(), Some(AtaError::Unusable));
        let mut m = model(Drive::Slave, 100);
        m.abort = Some(CMD_IDENTIFY);
        assert!(matches!(probe(m).err(), Some(AtaError::Device { error: ABRT, .. })));
    }

    /// A floating bus (no controller, or no device at all) reads 0xff.
    #[test]
    fn a_floating_bus_is_no_device() {
        struct Floating;
        impl Ports for Floating {
            fn read8(&mut self, _: u16) -> u8 {
                0xff
            }
            fn write8(&mut self, _: u16, _: u8) {}
            fn read_sector(&mut self, _: u16, _: &mut [u8]) {
                panic!("no data from nothing")
            }
            fn write_sector(&mut self, _: u16, _: &[u8]) {
                panic!("no data to nothing")
            }
            fn now_ns(&mut self) -> u64 {
                0
            }
        }
        assert_eq!(AtaDisk::probe(Floating, IO, CTL, Drive::Slave, 1, 10).err(), Some(AtaError::NoDevice));
    }

    #[test]
    fn reads_and_writes_reach_the_right_sectors_in_commands_of_at_most_256() {
        let mut d = probe(model(Drive::Slave, 1000)).unwrap();
        let data: Vec<u8> = (0..300 * SECTOR_SIZE).map(|i| (i * 7 + 3) as u8).collect();
        d.write_sectors(600, &data).unwrap();
        assert_eq!(&d.ports.disk[600 * SECTOR_SIZE..900 * SECTOR_SIZE], &data[..]);
        let mut back = vec![0u8; 300 * SECTOR_SIZE];
        d.read_sectors(600, &mut back).unwrap();
        assert_eq!(back, data);
        d.flush().unwrap();
        assert_eq!(
            d.ports.commands[1..],
            [
                (CMD_WRITE_SECTORS, 600, 256),
                (CMD_WRITE_SECTORS, 856, 44),
                (CMD_READ_SECTORS, 600, 256),
                (CMD_READ_SECTORS, 856, 44),
                (CMD_FLUSH_CACHE, 0, 256),
            ]
        );
        assert_eq!(d.resets, 0);
    }

    #[test]
    fn requests_outside_the_disk_never_reach_it() {
        let mut d = probe(model(Drive::Slave, 100)).unwrap();
        let before = d.ports.disk.clone();
        let mut buf = vec![0u8; 2 * SECTOR_SIZE];
        assert_eq!(d.read_sectors(99, &mut buf), Err(AtaError::OutOfRange));
        assert_eq!(d.write_sectors(100, &buf), Err(AtaError::OutOfRange));
        assert_eq!(d.write_sectors(u64::MAX, &buf), Err(AtaError::OutOfRange));
        assert_eq!(d.write_sectors(0, &buf[..100]), Err(AtaError::OutOfRange), "not whole sectors");
        assert_eq!(d.write_sectors(0, &[]), Err(AtaError::OutOfRange));
        assert_eq!(d.ports.commands.len(), 1, "only IDENTIFY");
        assert_eq!(d.ports.disk, before);
        assert_eq!(SyncDisk::read(&mut d, 99, &mut buf), Err(Errno::EINVAL));
    }

    #[test]
    fn a_device_that_stays_busy_times_out_and_the_channel_is_reset() {
        let mut d = probe(model(Drive::Slave, 100)).unwrap();
        d.ports.stuck = true;
        let mut buf = vec![0u8; SECTOR_SIZE];
        let reads = d.ports.status_reads;
        assert!(matches!(d.read_sectors(5, &mut buf), Err(AtaError::Timeout { status: ST_BSY })));
        // 1 ms of the model's clock (1 us per look at it): about 500 polls.
        assert!(d.ports.status_reads - reads < 2_000, "{} status reads", d.ports.status_reads - reads);
        assert_eq!((d.resets, d.ports.resets), (1, 1));
        assert_eq!(d.ports.control, CTL_NIEN, "interrupt still disabled after the reset");
        // The reset cleared the hang: the next request works.
        d.read_sectors(5, &mut buf).unwrap();
        assert_eq!(&buf[..], &d.ports.disk[5 * SECTOR_SIZE..6 * SECTOR_SIZE]);
        assert_eq!(SyncDisk::flush(&mut d), Ok(()));
        d.ports.stuck = true;
        assert_eq!(SyncDisk::flush(&mut d), Err(Errno::ETIMEDOUT));
    }

    #[test]
    fn a_stopped_clock_still_ends_the_wait() {
        let mut d = AtaDisk::probe(model(Drive::Slave, 100), IO, CTL, Drive::Slave, u64::MAX, 1_000).unwrap();
        d.ports.stuck = true;
        assert!(matches!(d.flush(), Err(AtaError::Timeout { .. })));
        assert!(d.ports.status_reads < 3_000);
    }

    #[test]
    fn device_errors_mid_transfer_are_reported_and_recovered_from() {
        let mut d = probe(model(Drive::Slave, 100)).unwrap();
        d.ports.bad_sector = Some(10);
        let mut buf = vec![0u8; 4 * SECTOR_SIZE];
        assert_eq!(d.read_sectors(8, &mut buf), Err(AtaError::Device { status: ST_DRDY | ST_ERR, error: UNC | ABRT }));
        assert_eq!(SyncDisk::write(&mut d, 8, &buf), Err(Errno::EIO));
        assert_eq!(d.resets, 2);
        d.ports.bad_sector = None;
        d.ports.abort = Some(CMD_FLUSH_CACHE);
        assert!(matches!(d.flush(), Err(AtaError::Device { error: ABRT, .. })));
        d.ports.abort = None;
        d.read_sectors(8, &mut buf).unwrap();
        d.flush().unwrap();
    }

    proptest! {
        /// Any mix of reads and writes matches a plain byte array; requests
        /// past the end are refused and change nothing.
        #[test]
        fn the_driver_agrees_with_a_model_disk(ops in proptest::collection::vec((any::<bool>(), 0u64..1100, 1u64..600, any::<u8>()), 1..12)) {
            let mut d = probe(model(Drive::Slave, 1000)).unwrap();
            let mut mirror = d.ports.disk.clone();
            for (write, lba, count, fill) in ops {
                let len = count as usize * SECTOR_SIZE;
                let inside = lba + count <= 1000;
                if write {
                    let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                    let r = d.write_sectors(lba, &data);
                    prop_assert_eq!(r.is_ok(), inside);
                    if inside {
                        mirror[lba as usize * SECTOR_SIZE..][..len].copy_from_slice(&data);
                    }
                } else {
                    let mut buf = vec![0u8; len];
                    let r = d.read_sectors(lba, &mut buf);
                    prop_assert_eq!(r.is_ok(), inside);
                    if inside {
                        prop_assert_eq!(&buf[..], &mirror[lba as usize * SECTOR_SIZE..][..len]);
                    }
                }
                prop_assert_eq!(&d.ports.disk, &mirror);
            }
            prop_assert_eq!(d.resets, 0);
        }
    }
}
