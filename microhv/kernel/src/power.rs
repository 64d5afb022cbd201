//! Stopping the machine with an exit code the runner can read.

use x86_64::instructions::port::Port;

/// Powers off: QEMU's isa-debug-exit (status `(code << 1) | 1`), then Bochs's
/// shutdown port, then halts forever if neither exists.
pub fn off(code: u8) -> ! {
    x86_64::instructions::interrupts::disable();
    // Let the UART drain first: Bochs stops at once and would cut the output.
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        let lsr = unsafe { Port::<u8>::new(0x3fd).read() };
        if lsr & 0x40 != 0 {
            break;
        }
    }
    // SAFETY: writes to the debug-exit and Bochs shutdown ports only stop the
    // emulator; on a machine without them the writes are ignored.
    unsafe {
        Port::<u32>::new(shared_abi::exit::DEBUG_EXIT_PORT).write(code as u32);
        let mut bochs = Port::<u8>::new(0x8900);
        for b in b"Shutdown" {
            bochs.write(*b);
        }
    }
    loop {
        x86_64::instructions::hlt();
    }
}
