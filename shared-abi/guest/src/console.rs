//! Console output through the `console_write` hypercall. microhv puts the
//! domain's name in front of every line.

use core::fmt::{self, Write};
use shared_abi::GuestVa;

use core::sync::atomic::{AtomicUsize, Ordering};

/// An alternative output for this guest's console (Dom0 drives the UART itself).
static SINK: AtomicUsize = AtomicUsize::new(0);

/// Sends all console output to `f` instead (used by Dom0, which owns the UART).
pub fn set_sink(f: fn(&[u8])) {
    SINK.store(f as usize, Ordering::SeqCst);
}

/// microhv's debug console: one hypercall per 4 KiB. microhv prints the
/// lines as `(name) text`.
pub fn debug_write(b: &[u8]) {
    for chunk in b.chunks(shared_abi::hypercall::CONSOLE_WRITE_MAX as usize) {
        // SAFETY: the buffer is valid for `len` bytes of reading.
        let _ = unsafe { crate::hypercall::console_write(GuestVa(chunk.as_ptr() as u64), chunk.len() as u64) };
    }
}

/// The PV console: bytes go into the `out` ring of the console page shared
/// with Dom0's backend, which prints them as `[name] text`. If the ring stays
/// full (no backend), the rest goes to the debug console instead.
fn ring_write(si: &crate::StartInfo, mut b: &[u8]) {
    let mut page = crate::mm::SharedPage(si.console_va as *mut u8);
    let mut stalls = 0;
    while !b.is_empty() {
        let n = shared_abi::console::write_out(&mut page, b);
        b = &b[n..];
        // SAFETY: no pointers. Fails harmlessly until Dom0 has bound the port.
        let _ = unsafe { crate::hypercall::evtchn_send(si.console_evtchn) };
        if n == 0 {
            stalls += 1;
            if stalls > 2000 {
                debug_write(b);
                return;
            }
            // SAFETY: no pointers; lets Dom0 drain the ring.
            let _ = unsafe { crate::hypercall::sched_yield() };
        }
    }
}

pub fn write_bytes(b: &[u8]) {
    let sink = SINK.load(Ordering::SeqCst);
    if sink != 0 {
        // SAFETY: only `fn(&[u8])` values are stored by set_sink.
        let f: fn(&[u8]) = unsafe { core::mem::transmute::<usize, fn(&[u8])>(sink) };
        return f(b);
    }
    match crate::try_start_info() {
        Some(si) if si.console_va != 0 => ring_write(si, b),
        _ => debug_write(b),
    }
}

/// Reads console input that Dom0 forwarded to this DomU (typed on the serial
/// line after switching to it). Returns the number of bytes read.
pub fn read_input(buf: &mut [u8]) -> usize {
    match crate::try_start_info() {
        Some(si) if si.console_va != 0 => {
            let mut page = crate::mm::SharedPage(si.console_va as *mut u8);
            shared_abi::console::read_in(&mut page, buf).unwrap_or(0)
        }
        _ => 0,
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
