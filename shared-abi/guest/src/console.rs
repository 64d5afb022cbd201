//! Console output through the `console_write` hypercall. microhv puts the
//! domain's name in front of every line.

use core::fmt::{self, Write};
use shared_abi::GuestVa;

pub fn write_bytes(b: &[u8]) {
    for chunk in b.chunks(shared_abi::hypercall::CONSOLE_WRITE_MAX as usize) {
        // SAFETY: the buffer is valid for `len` bytes of reading.
        let _ = unsafe { crate::hypercall::console_write(GuestVa(chunk.as_ptr() as u64), chunk.len() as u64) };
    }
}

pub fn write_str(s: &str) {
    write_bytes(s.as_bytes());
}

/// Formats into a line buffer and writes it with one hypercall per 256 bytes.
pub struct Console {
    buf: [u8; 256],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Console { buf: [0; 256], len: 0 }
    }
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    let mut c = Console::new();
    let _ = c.write_fmt(args);
    c.flush();
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
