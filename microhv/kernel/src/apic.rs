//! The local APIC and its timer, calibrated against the PIT, and the legacy
//! 8259 PICs (remapped and masked so they never raise exception vectors).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

pub const TIMER_VECTOR: u8 = 0x20;
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;
const TIMER_PERIODIC: u32 = 1 << 17;
const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_16: u32 = 0b0011;

const PIT_HZ: u64 = 1_193_182;
/// Calibration window: 50 ms of PIT channel 2.
const CALIBRATION_MS: u64 = 50;

static APIC_BASE: AtomicUsize = AtomicUsize::new(0);
static APIC_TIMER_HZ: AtomicU64 = AtomicU64::new(0);
/// APIC timer ticks per nanosecond, 32.32 fixed point (see `time.rs`).
static TICKS_PER_NS_FP32: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);

/// Physical base of the local APIC's registers (from IA32_APIC_BASE).
pub fn phys_base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86-64 CPUs).
    unsafe { Msr::new(IA32_APIC_BASE).read() & 0xFFFF_F000 }
}

fn reg(offset: usize) -> *mut u32 {
    (APIC_BASE.load(Ordering::Relaxed) + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: the APIC page is mapped uncached by mm::init before apic::init runs.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as in `read`.
    unsafe { reg(offset).write_volatile(value) }
}

/// Remaps the 8259 PICs to vectors 0x20..0x2f and masks every line.
fn disable_pic() {
    // SAFETY: standard 8259 initialisation sequence on its fixed ports.
    unsafe {
        let mut cmd1 = Port::<u8>::new(0x20);
        let mut data1 = Port::<u8>::new(0x21);
        let mut cmd2 = Port::<u8>::new(0xa0);
        let mut data2 = Port::<u8>::new(0xa1);
        cmd1.write(0x11);
        cmd2.write(0x11);
        data1.write(0x20);
        data2.write(0x28);
        data1.write(4);
        data2.write(2);
        data1.write(1);
        data2.write(1);
        data1.write(0xff);
        data2.write(0xff);
    }
}

/// Enables the local APIC (software enable, spurious vector) with its timer masked.
pub fn init(virt_base: usize) {
    disable_pic();
    APIC_BASE.store(virt_base, Ordering::Relaxed);
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
}

pub struct Calibration {
    pub tsc_hz: u64,
    pub apic_timer_hz: u64,
}

/// Measures the TSC and APIC timer rates over a 50 ms PIT channel-2 window.
pub fn calibrate() -> Calibration {
    let count = (PIT_HZ * CALIBRATION_MS / 1000) as u16;
    // SAFETY: port 0x61 bit 0 gates PIT channel 2, bit 1 enables the speaker
    // (kept off); 0x42/0x43 program channel 2. No other code uses them.
    let (tsc, apic) = unsafe {
        let mut ctl = Port::<u8>::new(0x61);
        let mut cmd = Port::<u8>::new(0x43);
        let mut ch2 = Port::<u8>::new(0x42);
        let v = ctl.read();
        ctl.write(v & !0x03); // gate low, speaker off
        cmd.write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
        ch2.write(count as u8);
        ch2.write((count >> 8) as u8);
        write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
        let v = ctl.read();
        write(REG_TIMER_INIT, u32::MAX);
        let t0 = crate::time::rdtsc();
        ctl.write((v & !0x02) | 0x01); // gate high: count down starts
        while ctl.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let t1 = crate::time::rdtsc();
        let elapsed = u32::MAX - read(REG_TIMER_CURRENT);
        write(REG_TIMER_INIT, 0);
        ((t1 - t0) * 1000 / CALIBRATION_MS, elapsed as u64 * 1000 / CALIBRATION_MS)
    };
    APIC_TIMER_HZ.store(apic, Ordering::Relaxed);
    TICKS_PER_NS_FP32.store(((apic as u128) << 32).div_euclid(1_000_000_000) as u64, Ordering::Relaxed);
    Calibration { tsc_hz: tsc, apic_timer_hz: apic }
}

/// Starts the periodic tick at `hz`.
pub fn start_periodic(hz: u64) {
    let period = (APIC_TIMER_HZ.load(Ordering::Relaxed) / hz).clamp(1, u32::MAX as u64) as u32;
    write(REG_LVT_TIMER, TIMER_PERIODIC | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, period);
}

/// Arms a one-shot timer interrupt `delta_ns` from now (clamped to what the
/// 32-bit counter holds).
pub fn arm_oneshot(delta_ns: u64) {
    let fp = TICKS_PER_NS_FP32.load(Ordering::Relaxed) as u128;
    let count = ((delta_ns as u128 * fp) >> 32).clamp(1, u32::MAX as u128) as u32;
    write(REG_LVT_TIMER, TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, count);
}

pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, 0);
}

pub fn eoi() {
    write(REG_EOI, 0);
}

pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

pub fn on_timer_tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    eoi();
}
