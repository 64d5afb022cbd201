//! The hypervisor's serial console (COM1) and its logger with levels.
//!
//! Every line carries the time since boot and its level, e.g.
//! `[    0.012345] INFO  heap: 4096 KiB at 0x400000`.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::SerialPort;

const COM1: u16 = 0x3f8;

static SERIAL: Mutex<SerialPort> = Mutex::new(
    // SAFETY: 0x3f8 is COM1 on every PC platform we boot on (QEMU pc/q35,
    // Bochs); within microhv only this console drives these ports.
    unsafe { SerialPort::new(COM1) },
);

/// Programs the UART (8N1, FIFO). Bochs garbles output without this.
pub fn init() {
    SERIAL.lock().init();
}

/// Writes without taking the console lock: for crash reports, which may
/// interrupt a holder of the lock. Output may interleave; it is never lost.
pub struct RawConsole;

impl Write for RawConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: same port as SERIAL; the UART tolerates a second writer, and
        // this is used only on the way to stopping the machine.
        let mut port = unsafe { SerialPort::new(COM1) };
        for b in s.bytes() {
            if b == b'\n' {
                port.send(b'\r');
            }
            port.send(b);
        }
        Ok(())
    }
}

struct Locked<'a>(&'a mut SerialPort);

impl Write for Locked<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.0.send(b'\r');
            }
            self.0.send(b);
        }
        Ok(())
    }
}

/// Prints formatted text to the console as one unit.
pub fn print(args: fmt::Arguments) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut port = SERIAL.lock();
        let _ = Locked(&mut port).write_fmt(args);
    });
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let us = crate::time::micros_since_boot();
        print(format_args!(
            "[{:5}.{:06}] {:5} {}\n",
            us / 1_000_000,
            us % 1_000_000,
            record.level(),
            record.args()
        ));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger; `level` comes from `loglevel=` on the command line.
pub fn init_logger(level: Option<&str>) -> Result<(), &str> {
    let filter = match level {
        None | Some("info") => log::LevelFilter::Info,
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some(other) => {
            log::set_max_level(log::LevelFilter::Info);
            let _ = log::set_logger(&LOGGER);
            return Err(other);
        }
    };
    log::set_max_level(filter);
    let _ = log::set_logger(&LOGGER);
    Ok(())
}
