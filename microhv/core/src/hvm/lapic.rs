//! The HVM guest's local APIC, in x2APIC mode (MSRs 0x800..=0x8ff): vector
//! state (IRR/ISR, TPR, EOI), the spurious-vector register, the LVT timer
//! (one-shot and periodic, with the divide register) and self-IPIs.
//!
//! Time is passed in as system time in nanoseconds; the timer counts at
//! [`TIMER_HZ`] before the divider (the guest reads that rate from CPUID
//! leaf 0x4000_0010, EBX in kHz). The kernel asks [`VLapic::deadline`] when
//! to look again, calls [`VLapic::tick`] before each VM entry and injects
//! [`VLapic::pending`].

/// First and last x2APIC MSR.
pub const MSR_FIRST: u32 = 0x800;
pub const MSR_LAST: u32 = 0x8ff;

/// The timer's input clock (before the divide configuration): 100 MHz.
pub const TIMER_HZ: u64 = 100_000_000;
const NS_PER_TICK: u64 = 1_000_000_000 / TIMER_HZ;
/// Shortest periodic-timer period: a guest cannot make microhv inject
/// faster than this (an "interrupt storm" just gets this rate).
pub const MIN_PERIOD_NS: u64 = 50_000;

const REG_ID: u32 = 0x802;
const REG_VERSION: u32 = 0x803;
const REG_TPR: u32 = 0x808;
const REG_PPR: u32 = 0x80a;
const REG_EOI: u32 = 0x80b;
const REG_LDR: u32 = 0x80d;
const REG_SVR: u32 = 0x80f;
const REG_ISR0: u32 = 0x810;
const REG_TMR0: u32 = 0x818;
const REG_IRR0: u32 = 0x820;
const REG_ESR: u32 = 0x828;
const REG_LVT_CMCI: u32 = 0x82f;
const REG_ICR: u32 = 0x830;
const REG_LVT_TIMER: u32 = 0x832;
const REG_LVT_ERROR: u32 = 0x837;
const REG_TIMER_INIT: u32 = 0x838;
const REG_TIMER_CURRENT: u32 = 0x839;
const REG_TIMER_DIVIDE: u32 = 0x83e;
const REG_SELF_IPI: u32 = 0x83f;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const TIMER_MODE_SHIFT: u32 = 17;
/// Version register: version 0x14, 7 LVT entries (max LVT index 6).
const VERSION: u64 = 0x0006_0014;

/// Why an access is refused: the guest gets a #GP, as on hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpFault;

#[derive(Clone, Debug)]
pub struct VLapic {
    irr: [u64; 4],
    isr: [u64; 4],
    tpr: u32,
    svr: u32,
    esr: u32,
    /// LVT entries: CMCI (0x82f), then 0x832..=0x837 (timer, thermal,
    /// perf, LINT0, LINT1, error).
    lvt_cmci: u32,
    lvt: [u32; 6],
    init_count: u32,
    divide_reg: u32,
    /// Start of the current countdown and when it reaches zero.
    period_ns: u64,
    deadline: Option<u64>,
    /// xAPIC mode: the high half of the ICR, written before the low half.
    icr_high: u32,
    /// Counters for the exit statistics.
    pub timer_fired: u64,
    pub injected: u64,
}

impl Default for VLapic {
    fn default() -> Self {
        Self::new()
    }
}

fn bit(v: u8) -> (usize, u64) {
    ((v / 64) as usize, 1u64 << (v % 64))
}

fn highest(bits: &[u64; 4]) -> Option<u8> {
    (0..4).rev().find(|&w| bits[w] != 0).map(|w| (w * 64 + 63 - bits[w].leading_zeros() as usize) as u8)
}

impl VLapic {
    /// The power-on state: software-disabled, every LVT masked.
    pub fn new() -> Self {
        VLapic {
            irr: [0; 4],
            isr: [0; 4],
            tpr: 0,
            svr: 0xff,
            esr: 0,
            lvt_cmci: LVT_MASKED,
            lvt: [LVT_MASKED; 6],
            init_count: 0,
            divide_reg: 0,
            period_ns: 0,
            deadline: None,
            icr_high: 0,
            timer_fired: 0,
            injected: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The divide configuration as a divisor (1..=128).
    pub fn divisor(&self) -> u64 {
        let d = self.divide_reg;
        match (d & 3) | ((d >> 1) & 4) {
            7 => 1,
            n => 2 << n,
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> TIMER_MODE_SHIFT) & 3
    }

    /// When the timer next needs attention (system time, ns).
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Marks vector `v` pending (vectors below 16 are illegal and dropped,
    /// with the ESR "illegal vector" bit set).
    pub fn raise(&mut self, v: u8) {
        if v < 16 {
            self.esr |= 1 << 6;
            return;
        }
        let (w, b) = bit(v);
        self.irr[w] |= b;
    }

    /// Fires the timer if it is due at `now`: marks its vector pending
    /// (unless masked or the APIC is disabled) and re-arms a periodic timer.
    /// Returns true when it fired.
    pub fn tick(&mut self, now: u64) -> bool {
        let Some(t) = self.deadline else { return false };
        if now < t {
            return false;
        }
        self.timer_fired += 1;
        if self.enabled() && self.lvt[0] & LVT_MASKED == 0 {
            self.raise(self.lvt[0] as u8);
        }
        self.deadline = if self.timer_mode() == 1 {
            // Periodic: the next period, skipping the ones already missed.
            let p = self.period_ns.max(MIN_PERIOD_NS);
            let mut next = t + p;
            if next <= now {
                next = now + p - (now - t) % p;
            }
            Some(next)
        } else {
            None
        };
        true
    }

    /// The vector to inject now, if any: the highest pending one whose
    /// priority class is above both the highest in service and the TPR.
    pub fn pending(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        let in_service = highest(&self.isr).map_or(0, |s| s >> 4);
        let tpr = (self.tpr >> 4) as u8;
        ((v >> 4) > in_service && (v >> 4) > tpr).then_some(v)
    }

    /// The CPU took vector `v` (it was injected): IRR -> ISR.
    pub fn ack(&mut self, v: u8) {
        let (w, b) = bit(v);
        self.irr[w] &= !b;
        self.isr[w] |= b;
        self.injected += 1;
    }

    /// End of interrupt: the highest vector in service is done.
    pub fn eoi(&mut self) {
        if let Some(v) = highest(&self.isr) {
            let (w, b) = bit(v);
            self.isr[w] &= !b;
        }
    }

    fn set_timer(&mut self, count: u32, now: u64) {
        self.init_count = count;
        if count == 0 || self.timer_mode() == 2 {
            // Zero stops it; TSC-deadline mode is not offered (CPUID says so).
            self.deadline = None;
            return;
        }
        self.period_ns = count as u64 * self.divisor() * NS_PER_TICK;
        let p = if self.timer_mode() == 1 { self.period_ns.max(MIN_PERIOD_NS) } else { self.period_ns };
        self.deadline = Some(now + p);
    }

    fn current_count(&self, now: u64) -> u32 {
        match self.deadline {
            Some(t) if t > now => ((t - now) / (self.divisor() * NS_PER_TICK)).min(self.init_count as u64) as u32,
            _ => 0,
        }
    }

    /// RDMSR of an x2APIC register.
    pub fn read_msr(&self, msr: u32, now: u64) -> Result<u64, GpFault> {
        let v = match msr {
            REG_ID => 0,
            REG_VERSION => VERSION,
            REG_TPR => self.tpr as u64,
            REG_PPR => {
                let isr = highest(&self.isr).map_or(0, |v| v as u32 & 0xf0);
                self.tpr.max(isr) as u64
            }
            REG_LDR => 1,
            REG_SVR => self.svr as u64,
            m if (REG_ISR0..REG_ISR0 + 8).contains(&m) => word32(&self.isr, m - REG_ISR0),
            m if (REG_TMR0..REG_TMR0 + 8).contains(&m) => 0,
            m if (REG_IRR0..REG_IRR0 + 8).contains(&m) => word32(&self.irr, m - REG_IRR0),
            REG_ESR => self.esr as u64,
            REG_LVT_CMCI => self.lvt_cmci as u64,
            REG_ICR => 0,
            m if (REG_LVT_TIMER..=REG_LVT_ERROR).contains(&m) => self.lvt[(m - REG_LVT_TIMER) as usize] as u64,
            REG_TIMER_INIT => self.init_count as u64,
            REG_TIMER_CURRENT => self.current_count(now) as u64,
            REG_TIMER_DIVIDE => self.divide_reg as u64,
            // EOI and SELF IPI are write-only; the rest is reserved.
            _ => return Err(GpFault),
        };
        Ok(v)
    }

    /// WRMSR of an x2APIC register.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<(), GpFault> {
        let v32 = value as u32;
        match msr {
            REG_TPR => self.tpr = v32 & 0xff,
            REG_EOI => {
                if value != 0 {
                    return Err(GpFault);
                }
                self.eoi();
            }
            REG_SVR => {
                self.svr = v32 & 0x1ff;
                if !self.enabled() {
                    // Software disable masks every LVT entry.
                    self.lvt_cmci |= LVT_MASKED;
                    for l in self.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => self.esr = 0,
            REG_LVT_CMCI => self.lvt_cmci = v32 & 0x1_07ff,
            REG_ICR => {
                let vector = value as u8;
                let mode = (value >> 8) & 7;
                let shorthand = (value >> 18) & 3;
                let to_self = shorthand == 1 || (shorthand == 0 && value >> 32 == 0) || shorthand == 2;
                // Fixed IPIs to ourselves are delivered; there is no other CPU.
                if mode == 0 && to_self {
                    self.raise(vector);
                }
            }
            m if (REG_LVT_TIMER..=REG_LVT_ERROR).contains(&m) => {
                let i = (m - REG_LVT_TIMER) as usize;
                let mut v = v32 & if i == 0 { 0x7_00ff } else { 0x1_07ff };
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                self.lvt[i] = v;
            }
            REG_TIMER_INIT => self.set_timer(v32, now),
            REG_TIMER_DIVIDE => self.divide_reg = v32 & 0b1011,
            REG_SELF_IPI => self.raise(value as u8),
            _ => return Err(GpFault),
        }
        Ok(())
    }
}

impl VLapic {
    /// A 32-bit read of the xAPIC page at `offset` (same registers as the
    /// x2APIC MSRs; ID in bits 31:24, DFR all ones; reserved ones read 0).
    pub fn read_mmio(&self, offset: u64, now: u64) -> u32 {
        match offset & 0xff0 {
            0x0e0 => u32::MAX,
            0x310 => self.icr_high,
            0x300 => 0,
            off => self.read_msr(MSR_FIRST + (off as u32 >> 4), now).unwrap_or(0) as u32,
        }
    }

    /// A 32-bit write to the xAPIC page: read-only and reserved registers
    /// ignore writes (as in xAPIC mode); EOI takes any value; a write to the
    /// ICR's low half sends the IPI.
    pub fn write_mmio(&mut self, offset: u64, value: u32, now: u64) {
        match offset & 0xff0 {
            0x0b0 => self.eoi(),
            0x0d0 | 0x0e0 | 0x3f0 => {}
            0x310 => self.icr_high = value,
            0x300 => {
                let _ = self.write_msr(REG_ICR, (self.icr_high as u64) << 32 | value as u64, now);
            }
            off => {
                let _ = self.write_msr(MSR_FIRST + (off as u32 >> 4), value as u64, now);
            }
        }
    }
}

fn word32(bits: &[u64; 4], i: u32) -> u64 {
    let i = i as usize;
    (bits[i / 2] >> (32 * (i % 2))) & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> VLapic {
        let mut l = VLapic::new();
        l.write_msr(REG_SVR, 0x1ff, 0).unwrap();
        l
    }

    #[test]
    fn one_shot_timer_fires_once_at_its_deadline() {
        let mut l = enabled();
        l.write_msr(REG_TIMER_DIVIDE, 0b1011, 0).unwrap(); // divide by 1
        assert_eq!(l.divisor(), 1);
        l.write_msr(REG_LVT_TIMER, 0x30, 0).unwrap();
        l.write_msr(REG_TIMER_INIT, 1_000_000, 1000).unwrap(); // 10 ms at 100 MHz
        assert_eq!(l.deadline(), Some(1000 + 10_000_000));
        assert_eq!(l.read_msr(REG_TIMER_CURRENT, 1000 + 5_000_000).unwrap(), 500_000);
        assert!(!l.tick(1000 + 9_999_999));
        assert_eq!(l.pending(), None);
        assert!(l.tick(1000 + 10_000_000));
        assert_eq!(l.pending(), Some(0x30));
        assert_eq!(l.deadline(), None);
        assert_eq!(l.read_msr(REG_TIMER_CURRENT, 1000 + 20_000_000).unwrap(), 0);
        l.ack(0x30);
        assert_eq!(l.pending(), None);
        assert_eq!(l.read_msr(REG_ISR0 + 1, 0).unwrap(), 1 << 16, "vector 0x30 in service");
        l.write_msr(REG_EOI, 0, 0).unwrap();
        assert_eq!(l.read_msr(REG_ISR0 + 1, 0).unwrap(), 0);
    }

    #[test]
    fn divide_configuration_scales_the_period() {
        let mut l = enabled();
        for (reg, div) in [(0b0000, 2), (0b0001, 4), (0b0010, 8), (0b0011, 16), (0b1000, 32), (0b1001, 64), (0b1010, 128), (0b1011, 1)] {
            l.write_msr(REG_TIMER_DIVIDE, reg, 0).unwrap();
            assert_eq!(l.divisor(), div, "{reg:#b}");
            l.write_msr(REG_TIMER_INIT, 100, 0).unwrap();
            assert_eq!(l.deadline(), Some(100 * div * NS_PER_TICK));
        }
    }

    #[test]
    fn periodic_timer_rearms_and_is_clamped_against_storms() {
        let mut l = enabled();
        l.write_msr(REG_TIMER_DIVIDE, 0b1011, 0).unwrap();
        l.write_msr(REG_LVT_TIMER, (1 << 17) | 0x40, 0).unwrap();
        l.write_msr(REG_TIMER_INIT, 1, 0).unwrap(); // 10 ns asked for
        assert_eq!(l.deadline(), Some(MIN_PERIOD_NS));
        assert!(l.tick(MIN_PERIOD_NS));
        assert_eq!(l.deadline(), Some(2 * MIN_PERIOD_NS));
        // Late by many periods: one interrupt, next deadline in the future.
        assert!(l.tick(10 * MIN_PERIOD_NS + 7));
        assert_eq!(l.deadline(), Some(11 * MIN_PERIOD_NS));
        assert_eq!(l.timer_fired, 2);
        // Still one pending vector: IRR coalesces.
        assert_eq!(l.pending(), Some(0x40));
    }

    #[test]
    fn masked_timer_or_disabled_apic_injects_nothing() {
        let mut l = enabled();
        l.write_msr(REG_LVT_TIMER, (LVT_MASKED | 0x30) as u64, 0).unwrap();
        l.write_msr(REG_TIMER_INIT, 10, 0).unwrap();
        assert!(l.tick(u64::MAX / 2));
        assert_eq!(l.pending(), None);
        let mut d = VLapic::new();
        d.raise(0x50);
        assert_eq!(d.pending(), None, "software-disabled APIC delivers nothing");
        d.write_msr(REG_LVT_TIMER, 0x30, 0).unwrap();
        assert_eq!(d.read_msr(REG_LVT_TIMER, 0).unwrap() & LVT_MASKED as u64, LVT_MASKED as u64);
    }

    #[test]
    fn priorities_nest_and_eoi_pops_the_highest() {
        let mut l = enabled();
        l.raise(0x31);
        l.ack(0x31);
        l.raise(0x35); // same class as in service: waits
        assert_eq!(l.pending(), None);
        l.raise(0x41); // higher class: nests
        assert_eq!(l.pending(), Some(0x41));
        l.ack(0x41);
        l.eoi(); // ends 0x41
        assert_eq!(l.pending(), None);
        l.eoi(); // ends 0x31
        assert_eq!(l.pending(), Some(0x35));
        l.write_msr(REG_TPR, 0x40, 0).unwrap();
        assert_eq!(l.pending(), None, "TPR blocks class 3");
    }

    #[test]
    fn self_ipis_and_illegal_vectors() {
        let mut l = enabled();
        l.write_msr(REG_SELF_IPI, 0x66, 0).unwrap();
        assert_eq!(l.pending(), Some(0x66));
        l.write_msr(REG_ICR, (1 << 18) | 0x77, 0).unwrap();
        assert_eq!(l.pending(), Some(0x77));
        l.write_msr(REG_SELF_IPI, 3, 0).unwrap();
        assert_ne!(l.read_msr(REG_ESR, 0).unwrap() & (1 << 6), 0);
    }

    #[test]
    fn xapic_page_reaches_the_same_registers() {
        let mut l = VLapic::new();
        l.write_mmio(0xf0, 0x1ff, 0);
        assert!(l.enabled());
        l.write_mmio(0x3e0, 0b1011, 0);
        l.write_mmio(0x320, 0x30, 0);
        l.write_mmio(0x380, 1000, 0);
        assert_eq!(l.read_mmio(0x380, 0), 1000);
        assert_eq!(l.read_mmio(0x390, 5000), 500);
        assert!(l.tick(10_000));
        assert_eq!(l.pending(), Some(0x30));
        l.ack(0x30);
        l.write_mmio(0xb0, 0x1234, 0); // any value is an EOI in xAPIC mode
        assert_eq!(l.read_mmio(0x110, 0), 0, "ISR cleared");
        // ICR: high half first, then the low half sends (fixed, self).
        l.write_mmio(0x310, 0, 0);
        l.write_mmio(0x300, (1 << 18) | 0x55, 0);
        assert_eq!(l.pending(), Some(0x55));
        assert_eq!(l.read_mmio(0xe0, 0), u32::MAX);
        assert_eq!(l.read_mmio(0x30, 0) & 0xff, 0x14, "version");
        // Writes to read-only registers are ignored, not faults.
        l.write_mmio(0x20, 7, 0);
        l.write_mmio(0x390, 7, 0);
        for off in (0..0x1000).step_by(4) {
            let _ = l.read_mmio(off, 1);
            l.write_mmio(off, u32::MAX, 1);
        }
    }

    #[test]
    fn reserved_and_write_only_registers_fault() {
        let mut l = enabled();
        assert_eq!(l.read_msr(REG_EOI, 0), Err(GpFault));
        assert_eq!(l.read_msr(0x8ff, 0), Err(GpFault));
        assert_eq!(l.write_msr(REG_ID, 5, 0), Err(GpFault));
        assert_eq!(l.write_msr(REG_EOI, 1, 0), Err(GpFault));
        assert_eq!(l.read_msr(REG_VERSION, 0).unwrap() & 0xff, 0x14);
        for m in MSR_FIRST..=MSR_LAST {
            let _ = l.read_msr(m, 5);
            let _ = l.write_msr(m, u64::MAX, 5);
        }
    }
}
