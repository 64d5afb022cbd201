//! Access to machine frames by number. The hypervisor implements it over its
//! identity mapping; tests use [`FakeMachine`]. Page-table and guest-memory
//! logic goes through this trait so it can run on the host.

pub use shared_abi::Mfn;

pub const FRAME_SIZE: usize = 4096;

pub trait MachineMemory {
    /// Reads the 8-byte entry `index` (0..512) of frame `mfn`.
    fn read_u64(&self, mfn: Mfn, index: usize) -> u64;
    /// Writes the 8-byte entry `index` (0..512) of frame `mfn` in one store.
    fn write_u64(&mut self, mfn: Mfn, index: usize, val: u64);
    /// Copies bytes out of a frame; `offset + buf.len()` must be <= 4096.
    fn read_bytes(&self, mfn: Mfn, offset: usize, buf: &mut [u8]);
    /// Copies bytes into a frame; `offset + data.len()` must be <= 4096.
    fn write_bytes(&mut self, mfn: Mfn, offset: usize, data: &[u8]);
    /// Fills a frame with zeroes.
    fn zero(&mut self, mfn: Mfn) {
        self.write_bytes(mfn, 0, &[0u8; FRAME_SIZE]);
    }
}

#[cfg(test)]
pub use fake::FakeMachine;

#[cfg(test)]
mod fake {
    use super::*;
    use std::collections::HashMap;

    /// Sparse fake machine memory: frames spring into existence zeroed.
    #[derive(Default)]
    pub struct FakeMachine {
        pub frames: HashMap<u64, Box<[u8; FRAME_SIZE]>>,
        /// Every `write_u64` in order: (mfn, index, value).
        pub entry_writes: Vec<(u64, usize, u64)>,
    }

    impl FakeMachine {
        fn frame(&self, mfn: Mfn) -> [u8; FRAME_SIZE] {
            self.frames.get(&mfn.0).map_or([0; FRAME_SIZE], |f| **f)
        }
        fn frame_mut(&mut self, mfn: Mfn) -> &mut [u8; FRAME_SIZE] {
            self.frames.entry(mfn.0).or_insert_with(|| Box::new([0; FRAME_SIZE]))
        }
    }

    impl MachineMemory for FakeMachine {
        fn read_u64(&self, mfn: Mfn, index: usize) -> u64 {
            let f = self.frame(mfn);
            u64::from_le_bytes(f[index * 8..index * 8 + 8].try_into().unwrap())
        }
        fn write_u64(&mut self, mfn: Mfn, index: usize, val: u64) {
            self.entry_writes.push((mfn.0, index, val));
            self.frame_mut(mfn)[index * 8..index * 8 + 8].copy_from_slice(&val.to_le_bytes());
        }
        fn read_bytes(&self, mfn: Mfn, offset: usize, buf: &mut [u8]) {
            let f = self.frame(mfn);
            buf.copy_from_slice(&f[offset..offset + buf.len()]);
        }
        fn write_bytes(&mut self, mfn: Mfn, offset: usize, data: &[u8]) {
            self.frame_mut(mfn)[offset..offset + data.len()].copy_from_slice(data);
        }
    }
}
