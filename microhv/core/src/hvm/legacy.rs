//! The legacy PC devices an HVM guest may touch: the two 8259 PICs (they
//! accept their initialisation sequence and keep their masks, but never
//! raise an interrupt: guests use the local APIC) and the 8254 PIT with the
//! port-0x61 gate (counters and channel-2 output computed from system time,
//! so a guest can calibrate against it; channel 0 interrupts are not
//! delivered).

/// PIT input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// One 8259: init sequence state and the interrupt mask.
#[derive(Clone, Debug, Default)]
pub struct Pic {
    pub imr: u8,
    /// ICW2: vector base the guest chose.
    pub vector_base: u8,
    /// Remaining initialisation words expected (ICW2..ICW4).
    init_step: u8,
    needs_icw4: bool,
    read_isr: bool,
}

impl Pic {
    /// Command port (0x20 / 0xa0) write.
    pub fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: start of initialisation; the mask is cleared.
            self.init_step = 1;
            self.needs_icw4 = v & 1 != 0;
            self.imr = 0;
        } else if v & 0x18 == 0x08 {
            // OCW3: choose IRR or ISR for command-port reads.
            if v & 2 != 0 {
                self.read_isr = v & 1 != 0;
            }
        }
        // OCW2 (EOIs) need no action: nothing is ever in service.
    }

    /// Data port (0x21 / 0xa1) write.
    pub fn write_data(&mut self, v: u8) {
        match self.init_step {
            1 => {
                self.vector_base = v & 0xf8;
                self.init_step = 2;
            }
            2 => self.init_step = if self.needs_icw4 { 3 } else { 0 },
            3 => self.init_step = 0,
            _ => self.imr = v,
        }
    }

    /// Command port read: IRR or ISR, both always empty.
    pub fn read_command(&self) -> u8 {
        0
    }

    pub fn read_data(&self) -> u8 {
        self.imr
    }
}

#[derive(Clone, Debug, Default)]
struct Channel {
    mode: u8,
    /// 1 = low byte, 2 = high byte, 3 = low then high.
    access: u8,
    reload: u16,
    /// When counting started (system time, ns); None = not counting.
    start: Option<u64>,
    write_high_next: bool,
    read_high_next: bool,
    latched: Option<u16>,
    partial: u8,
}

impl Channel {
    fn reload_value(&self) -> u64 {
        if self.reload == 0 {
            65536
        } else {
            self.reload as u64
        }
    }

    fn elapsed_ticks(&self, now: u64) -> Option<u64> {
        self.start.map(|s| ((now.saturating_sub(s) as u128 * PIT_HZ as u128) / 1_000_000_000) as u64)
    }

    fn count(&self, now: u64) -> u16 {
        let r = self.reload_value();
        match self.elapsed_ticks(now) {
            None => self.reload,
            Some(e) if self.mode == 0 || self.mode == 1 => r.saturating_sub(e) as u16,
            Some(e) => (r - e % r) as u16,
        }
    }

    /// Output pin (modes 0/1: high once the count ran out).
    fn out(&self, now: u64) -> bool {
        match self.elapsed_ticks(now) {
            None => self.mode != 0,
            Some(e) if self.mode <= 1 => e >= self.reload_value(),
            Some(e) if self.mode == 3 => e % self.reload_value() < self.reload_value() / 2,
            Some(_) => true,
        }
    }
}

/// The 8254 PIT and the port-0x61 gate/status bits.
#[derive(Clone, Debug, Default)]
pub struct Pit {
    ch: [Channel; 3],
    /// Port 0x61 bits 0 (channel-2 gate) and 1 (speaker data).
    port61: u8,
    refresh: bool,
}

impl Pit {
    fn gate(&self, i: usize) -> bool {
        i != 2 || self.port61 & 1 != 0
    }

    /// Port 0x43.
    pub fn write_control(&mut self, v: u8, now: u64) {
        let i = (v >> 6) as usize;
        if i == 3 {
            // Read-back command: latch the counts of the selected channels.
            if v & 0x20 == 0 {
                for c in 0..3 {
                    if v & (2 << c) != 0 {
                        self.ch[c].latched = Some(self.ch[c].count(now));
                    }
                }
            }
            return;
        }
        let access = (v >> 4) & 3;
        let c = &mut self.ch[i];
        if access == 0 {
            c.latched = Some(c.count(now));
            return;
        }
        c.access = access;
        c.mode = match (v >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        c.start = None;
        c.write_high_next = false;
        c.read_high_next = false;
    }

    /// Ports 0x40..=0x42.
    pub fn write_counter(&mut self, i: usize, v: u8, now: u64) {
        let gate = self.gate(i);
        let c = &mut self.ch[i];
        let done = match c.access {
            1 => {
                c.reload = v as u16;
                true
            }
            2 => {
                c.reload = (v as u16) << 8;
                true
            }
            _ if !c.write_high_next => {
                c.partial = v;
                c.write_high_next = true;
                false
            }
            _ => {
                c.reload = u16::from_le_bytes([c.partial, v]);
                c.write_high_next = false;
                true
            }
        };
        if done {
            c.start = gate.then_some(now);
        }
    }

    /// Ports 0x40..=0x42.
    pub fn read_counter(&mut self, i: usize, now: u64) -> u8 {
        let c = &mut self.ch[i];
        let value = c.latched.unwrap_or_else(|| c.count(now));
        let [lo, hi] = value.to_le_bytes();
        match c.access {
            2 => {
                c.latched = None;
                hi
            }
            3 if !c.read_high_next => {
                c.read_high_next = true;
                lo
            }
            3 => {
                c.read_high_next = false;
                c.latched = None;
                hi
            }
            _ => {
                c.latched = None;
                lo
            }
        }
    }

    /// Port 0x61 read: gate, speaker, refresh toggle (bit 4), channel-2 out (bit 5).
    pub fn read_port61(&mut self, now: u64) -> u8 {
        self.refresh = !self.refresh;
        let out2 = self.ch[2].out(now);
        self.port61 & 3 | (self.refresh as u8) << 4 | (out2 as u8) << 5
    }

    /// Port 0x61 write: a rising gate restarts channel 2; a low gate stops it.
    pub fn write_port61(&mut self, v: u8, now: u64) {
        let rising = v & 1 != 0 && self.port61 & 1 == 0;
        self.port61 = v & 3;
        if rising {
            self.ch[2].start = Some(now);
        } else if v & 1 == 0 {
            self.ch[2].start = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_init_sequence_then_mask() {
        let mut p = Pic::default();
        p.write_command(0x11);
        p.write_data(0x20);
        p.write_data(0x04);
        p.write_data(0x01);
        assert_eq!(p.vector_base, 0x20);
        assert_eq!(p.read_data(), 0);
        p.write_data(0xfb);
        assert_eq!(p.read_data(), 0xfb);
        p.write_command(0x20); // EOI: nothing in service, nothing changes
        assert_eq!(p.read_command(), 0);
    }

    #[test]
    fn pit_channel2_calibration_loop_sees_its_output_go_high() {
        // The classic calibration: gate low, mode 0 count N, gate high, poll bit 5.
        let mut pit = Pit::default();
        pit.write_port61(0, 0);
        pit.write_control(0b1011_0000, 0);
        let n: u16 = 59659; // 50 ms
        pit.write_counter(2, n as u8, 0);
        pit.write_counter(2, (n >> 8) as u8, 0);
        let t0 = 1_000_000;
        pit.write_port61(1, t0);
        assert_eq!(pit.read_port61(t0 + 49_000_000) & 0x20, 0);
        assert_eq!(pit.read_port61(t0 + 50_001_000) & 0x20, 0x20);
    }

    #[test]
    fn pit_counter_reads_count_down_lo_then_hi() {
        let mut pit = Pit::default();
        pit.write_control(0b0011_0100, 0); // channel 0, lo/hi, mode 2
        pit.write_counter(0, 0x00, 0);
        pit.write_counter(0, 0x10, 0); // 4096
        // After 1 ms: 1193 ticks gone.
        let now = 1_000_000;
        pit.write_control(0b0000_0000, now); // latch channel 0
        let lo = pit.read_counter(0, now + 5_000_000);
        let hi = pit.read_counter(0, now + 5_000_000);
        assert_eq!(u16::from_le_bytes([lo, hi]), 4096 - 1193);
    }

    #[test]
    fn any_pit_input_is_safe() {
        let mut pit = Pit::default();
        for v in 0..=255u8 {
            pit.write_control(v, v as u64);
            for i in 0..3 {
                pit.write_counter(i, v, 7);
                let _ = pit.read_counter(i, u64::MAX);
            }
            pit.write_port61(v, 3);
            let _ = pit.read_port61(u64::MAX);
        }
    }
}
