//! A ring allocator over one caller-owned buffer. Regions are handed out in order and may
//! be freed in any order; space comes back once every older region is free too.

use std::collections::VecDeque;

#[derive(Debug)]
struct Region {
    start: u64,
    len: u64,
    free: bool,
}

#[derive(Debug)]
pub struct Ring {
    cap: u64,
    regions: VecDeque<Region>,
    used: u64,
    peak: u64,
}

impl Ring {
    pub fn new(cap: u64) -> Ring {
        Ring {
            cap,
            regions: VecDeque::new(),
            used: 0,
            peak: 0,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Bytes in live regions (allocated and not yet freed).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The most bytes ever live at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Reserves `len > 0` contiguous bytes, returning their offset, or None if they do not
    /// fit now.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let start = self.fits(len)?;
        self.regions.push_back(Region {
            start,
            len,
            free: false,
        });
        self.used += len;
        self.peak = self.peak.max(self.used);
        Some(start)
    }

    /// Where [`Ring::alloc`] would place `len > 0` bytes now, without reserving them, or
    /// None if they do not fit now.
    pub fn fits(&self, len: u64) -> Option<u64> {
        debug_assert!(len > 0);
        if len > self.cap {
            return None;
        }
        let start = match (self.regions.front(), self.regions.back()) {
            (None, _) | (_, None) => 0,
            (Some(first), Some(last)) => {
                let head = last.start + last.len;
                let tail = first.start;
                if last.start >= first.start {
                    // Not wrapped: space after head, else at the beginning before tail.
                    if self.cap - head >= len {
                        head
                    } else if tail >= len {
                        0
                    } else {
                        return None;
                    }
                } else if tail - head >= len {
                    head
                } else {
                    return None;
                }
            }
        };
        Some(start)
    }

    /// Frees the live region of exactly `[start, start + len)`; returns its length, or None
    /// if there is no such live region (nothing is freed then).
    pub fn free(&mut self, start: u64, len: u64) -> Option<u64> {
        let r = self
            .regions
            .iter_mut()
            .find(|r| r.start == start && r.len == len && !r.free)?;
        r.free = true;
        let len = r.len;
        self.used -= len;
        while self.regions.front().is_some_and(|r| r.free) {
            self.regions.pop_front();
        }
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_frees_out_of_order() {
        let mut r = Ring::new(100);
        let a = r.alloc(40).unwrap();
        let b = r.alloc(40).unwrap();
        assert_eq!((a, b), (0, 40));
        assert!(r.alloc(30).is_none());
        assert_eq!((r.fits(20), r.fits(21)), (Some(80), None));
        assert_eq!(r.used(), 80, "fits reserves nothing");
        r.free(b, 40).unwrap(); // out of order: b is free but a still blocks the front
        assert!(r.alloc(30).is_none() || r.used() <= 100);
        r.free(a, 40).unwrap();
        assert_eq!(r.used(), 0);
        let c = r.alloc(100).unwrap();
        assert_eq!(c, 0);
        assert!(r.free(77, 1).is_none());
        assert!(r.free(0, 99).is_none(), "a wrong length frees nothing");
        assert_eq!(r.used(), 100);
    }

    proptest::proptest! {
        #[test]
        fn never_overlaps_or_exceeds(ops in proptest::collection::vec((1u64..60, proptest::bool::ANY), 1..200)) {
            let mut r = Ring::new(128);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (len, free_first) in ops {
                if free_first && !live.is_empty() {
                    let (s, l) = live.remove(len as usize % live.len());
                    r.free(s, l).unwrap();
                }
                if let Some(s) = r.alloc(len) {
                    for &(s2, l2) in &live {
                        proptest::prop_assert!(s + len <= s2 || s2 + l2 <= s, "overlap");
                    }
                    proptest::prop_assert!(s + len <= 128);
                    live.push((s, len));
                }
                proptest::prop_assert!(r.used() <= 128);
                proptest::prop_assert_eq!(r.used(), live.iter().map(|x| x.1).sum::<u64>());
            }
            for (s, l) in live { r.free(s, l).unwrap(); }
            proptest::prop_assert_eq!(r.alloc(128), Some(0));
        }
    }
}
