//! The PV console page: two byte rings shared by a guest and Dom0's console
//! back end, `in` (Dom0 -> guest) and `out` (guest -> Dom0), with their
//! free-running `u32` indices (the layout of Xen's console interface).
//!
//! | offset | size | field | written by |
//! | --- | --- | --- | --- |
//! | 0 | 1024 | `in` bytes | Dom0 |
//! | 1024 | 2048 | `out` bytes | guest |
//! | 3072 | 4 | `in_cons` | guest |
//! | 3076 | 4 | `in_prod` | Dom0 |
//! | 3080 | 4 | `out_cons` | Dom0 |
//! | 3084 | 4 | `out_prod` | guest |
//!
//! Byte `i` of a stream lives at `ring[i & (size - 1)]`; a ring holds
//! `prod - cons` (wrapping) unread bytes, at most its size. Each function
//! reads the indices from the page, so either side may be restarted. Readers
//! validate the peer's indices and return [`RingError::BadIndex`] for a
//! ring claiming more than its size; writers treat such a ring as full.
//! A page of zeroes is two empty rings.

use crate::ring::{RingError, SharedMem, PAGE_SIZE};

/// Offset of the `in` ring (Dom0 -> guest).
pub const IN_OFF: usize = 0;
/// Size of the `in` ring.
pub const IN_SIZE: usize = 1024;
/// Offset of the `out` ring (guest -> Dom0).
pub const OUT_OFF: usize = 1024;
/// Size of the `out` ring.
pub const OUT_SIZE: usize = 2048;
/// Offset of `in_cons`, advanced by the guest.
pub const IN_CONS_OFF: usize = 3072;
/// Offset of `in_prod`, advanced by Dom0.
pub const IN_PROD_OFF: usize = 3076;
/// Offset of `out_cons`, advanced by Dom0.
pub const OUT_CONS_OFF: usize = 3080;
/// Offset of `out_prod`, advanced by the guest.
pub const OUT_PROD_OFF: usize = 3084;

const _: () = {
    assert!(IN_SIZE.is_power_of_two() && OUT_SIZE.is_power_of_two());
    assert!(IN_OFF + IN_SIZE <= OUT_OFF);
    assert!(OUT_OFF + OUT_SIZE <= IN_CONS_OFF);
    assert!(IN_PROD_OFF == IN_CONS_OFF + 4);
    assert!(OUT_CONS_OFF == IN_PROD_OFF + 4);
    assert!(OUT_PROD_OFF == OUT_CONS_OFF + 4);
    assert!(OUT_PROD_OFF + 4 <= PAGE_SIZE);
    assert!(IN_CONS_OFF.is_multiple_of(4));
};

/// One byte ring of the page.
struct ByteRing {
    data: usize,
    size: usize,
    cons: usize,
    prod: usize,
}

const IN: ByteRing = ByteRing { data: IN_OFF, size: IN_SIZE, cons: IN_CONS_OFF, prod: IN_PROD_OFF };
const OUT: ByteRing = ByteRing { data: OUT_OFF, size: OUT_SIZE, cons: OUT_CONS_OFF, prod: OUT_PROD_OFF };

impl ByteRing {
    /// Copies up to `data.len()` bytes in; returns how many fit.
    fn produce(&self, mem: &mut impl SharedMem, data: &[u8]) -> usize {
        let cons = mem.read_u32(self.cons);
        let prod = mem.read_u32(self.prod);
        let used = prod.wrapping_sub(cons) as usize;
        if used > self.size {
            return 0;
        }
        let n = data.len().min(self.size - used);
        let start = prod as usize & (self.size - 1);
        let first = n.min(self.size - start);
        mem.write(self.data + start, &data[..first]);
        mem.write(self.data, &data[first..n]);
        mem.write_u32(self.prod, prod.wrapping_add(n as u32));
        n
    }

    /// Copies up to `buf.len()` unread bytes out; returns how many.
    fn consume(&self, mem: &mut impl SharedMem, buf: &mut [u8]) -> Result<usize, RingError> {
        let prod = mem.read_u32(self.prod);
        let cons = mem.read_u32(self.cons);
        let avail = prod.wrapping_sub(cons) as usize;
        if avail > self.size {
            return Err(RingError::BadIndex { prod, cons });
        }
        let n = buf.len().min(avail);
        let start = cons as usize & (self.size - 1);
        let first = n.min(self.size - start);
        mem.read(self.data + start, &mut buf[..first]);
        mem.read(self.data, &mut buf[first..n]);
        mem.write_u32(self.cons, cons.wrapping_add(n as u32));
        Ok(n)
    }

    fn pending(&self, mem: &impl SharedMem) -> Result<usize, RingError> {
        let prod = mem.read_u32(self.prod);
        let cons = mem.read_u32(self.cons);
        let avail = prod.wrapping_sub(cons) as usize;
        if avail > self.size {
            return Err(RingError::BadIndex { prod, cons });
        }
        Ok(avail)
    }
}

/// Resets all four indices to 0 (both rings empty). The byte areas are left
/// as they are.
pub fn init(mem: &mut impl SharedMem) {
    for off in [IN_CONS_OFF, IN_PROD_OFF, OUT_CONS_OFF, OUT_PROD_OFF] {
        mem.write_u32(off, 0);
    }
}

/// Guest side: appends as much of `data` as fits to `out`; returns the
/// number of bytes written (0 if the ring is full or its indices are bad).
pub fn write_out(mem: &mut impl SharedMem, data: &[u8]) -> usize {
    OUT.produce(mem, data)
}

/// Dom0 side: reads up to `buf.len()` bytes from `out`.
pub fn read_out(mem: &mut impl SharedMem, buf: &mut [u8]) -> Result<usize, RingError> {
    OUT.consume(mem, buf)
}

/// Dom0 side: appends as much of `data` as fits to `in`; returns the number
/// of bytes written (0 if the ring is full or its indices are bad).
pub fn write_in(mem: &mut impl SharedMem, data: &[u8]) -> usize {
    IN.produce(mem, data)
}

/// Guest side: reads up to `buf.len()` bytes from `in`.
pub fn read_in(mem: &mut impl SharedMem, buf: &mut [u8]) -> Result<usize, RingError> {
    IN.consume(mem, buf)
}

/// Unread bytes in `out` (validated as by [`read_out`]).
pub fn out_pending(mem: &impl SharedMem) -> Result<usize, RingError> {
    OUT.pending(mem)
}

/// Unread bytes in `in` (validated as by [`read_in`]).
pub fn in_pending(mem: &impl SharedMem) -> Result<usize, RingError> {
    IN.pending(mem)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::ring::PageBuf;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn zeroed_page_is_empty() {
        let mut mem = PageBuf::new();
        let mut buf = [0u8; 16];
        assert_eq!(read_out(&mut mem, &mut buf), Ok(0));
        assert_eq!(read_in(&mut mem, &mut buf), Ok(0));
        assert_eq!(out_pending(&mem), Ok(0));
    }

    #[test]
    fn out_round_trip_and_layout() {
        let mut mem = PageBuf::new();
        assert_eq!(write_out(&mut mem, b"hello"), 5);
        assert_eq!(&mem.0[OUT_OFF..OUT_OFF + 5], b"hello");
        assert_eq!(mem.read_u32(OUT_PROD_OFF), 5);
        assert_eq!(out_pending(&mem), Ok(5));
        let mut buf = [0u8; 3];
        assert_eq!(read_out(&mut mem, &mut buf), Ok(3));
        assert_eq!(&buf, b"hel");
        assert_eq!(mem.read_u32(OUT_CONS_OFF), 3);
        let mut buf = [0u8; 10];
        assert_eq!(read_out(&mut mem, &mut buf), Ok(2));
        assert_eq!(&buf[..2], b"lo");
    }

    #[test]
    fn in_writes_only_what_fits() {
        let mut mem = PageBuf::new();
        let data = vec![7u8; 1500];
        assert_eq!(write_in(&mut mem, &data), IN_SIZE);
        assert_eq!(write_in(&mut mem, b"x"), 0);
        let mut buf = vec![0u8; 2000];
        assert_eq!(read_in(&mut mem, &mut buf), Ok(IN_SIZE));
        assert!(buf[..IN_SIZE].iter().all(|&b| b == 7));
        // The out ring was not touched.
        assert_eq!(out_pending(&mem), Ok(0));
    }

    #[test]
    fn wraps_around_the_index_space() {
        let mut mem = PageBuf::new();
        for off in [OUT_CONS_OFF, OUT_PROD_OFF] {
            mem.write_u32(off, u32::MAX - 3);
        }
        let data: Vec<u8> = (0..100).collect();
        assert_eq!(write_out(&mut mem, &data), 100);
        assert_eq!(mem.read_u32(OUT_PROD_OFF), 96);
        // Byte 0 of the stream sits at slot (u32::MAX - 3) & 2047 = 2044.
        assert_eq!(mem.0[OUT_OFF + 2044], 0);
        assert_eq!(mem.0[OUT_OFF], 4);
        let mut buf = [0u8; 100];
        assert_eq!(read_out(&mut mem, &mut buf), Ok(100));
        assert_eq!(&buf[..], &data[..]);
    }

    #[test]
    fn garbage_indices_are_rejected() {
        let mut mem = PageBuf::new();
        mem.write_u32(OUT_PROD_OFF, 2049);
        let mut buf = [0u8; 8];
        assert_eq!(read_out(&mut mem, &mut buf), Err(RingError::BadIndex { prod: 2049, cons: 0 }));
        assert_eq!(out_pending(&mem), Err(RingError::BadIndex { prod: 2049, cons: 0 }));
        assert_eq!(write_out(&mut mem, b"abc"), 0);
        // Consumer index ahead of the producer.
        mem.write_u32(IN_CONS_OFF, 5);
        assert_eq!(read_in(&mut mem, &mut buf), Err(RingError::BadIndex { prod: 0, cons: 5 }));
        assert_eq!(write_in(&mut mem, b"abc"), 0);
        // A full ring is not an error.
        mem.write_u32(OUT_PROD_OFF, 2048);
        assert_eq!(read_out(&mut mem, &mut buf), Ok(8));
    }

    #[test]
    fn init_clears_indices() {
        let mut mem = PageBuf([0xFF; PAGE_SIZE]);
        init(&mut mem);
        assert_eq!(in_pending(&mem), Ok(0));
        assert_eq!(out_pending(&mem), Ok(0));
    }

    proptest! {
        #[test]
        fn stream_matches_a_model(
            start in prop_oneof![(u32::MAX - 3000)..=u32::MAX, any::<u32>()],
            ops in proptest::collection::vec((any::<bool>(), 0usize..3000), 1..60),
        ) {
            let mut mem = PageBuf::new();
            mem.write_u32(OUT_CONS_OFF, start);
            mem.write_u32(OUT_PROD_OFF, start);
            let mut model: VecDeque<u8> = VecDeque::new();
            let mut next = 0u8;
            for (write, len) in ops {
                if write {
                    let data: Vec<u8> = (0..len).map(|i| next.wrapping_add(i as u8)).collect();
                    let n = write_out(&mut mem, &data);
                    prop_assert_eq!(n, len.min(OUT_SIZE - model.len()));
                    model.extend(&data[..n]);
                    next = next.wrapping_add(n as u8);
                } else {
                    let mut buf = vec![0u8; len];
                    let n = read_out(&mut mem, &mut buf).unwrap();
                    prop_assert_eq!(n, len.min(model.len()));
                    let want: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(&buf[..n], &want[..]);
                }
                prop_assert_eq!(out_pending(&mem), Ok(model.len()));
            }
        }

        #[test]
        fn garbage_indices_never_panic(idx in any::<[u32; 4]>(), len in 0usize..5000) {
            let mut mem = PageBuf::new();
            for (i, v) in idx.iter().enumerate() {
                mem.write_u32(IN_CONS_OFF + 4 * i, *v);
            }
            let mut buf = vec![0u8; len];
            for r in [read_out(&mut mem, &mut buf), read_in(&mut mem, &mut buf)] {
                match r {
                    Ok(n) => prop_assert!(n <= len),
                    Err(RingError::BadIndex { .. }) => {}
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
            }
            prop_assert!(write_out(&mut mem, &buf) <= OUT_SIZE);
            prop_assert!(write_in(&mut mem, &buf) <= IN_SIZE);
        }
    }
}
