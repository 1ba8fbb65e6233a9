//! A fixed-size set of bits, and zeroed vectors, allocated fallibly and
//! lazily: their size follows a node's size, which a client chooses, so a
//! huge node is an error, not an abort, and memory never written is not
//! used.

use std::alloc::{self, Layout};
use std::fmt;
use std::sync::atomic::AtomicU64;

/// Memory for a vector could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    /// The bytes asked for.
    pub bytes: usize,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cannot allocate {} bytes of memory", self.bytes)
    }
}

impl std::error::Error for OutOfMemory {}

/// Types for which all-zero bytes are a valid value.
///
/// # Safety
///
/// Implementors must be valid when every byte is zero.
pub(crate) unsafe trait Zeroed: Sized {}

// SAFETY: every bit pattern is a valid u64.
unsafe impl Zeroed for u64 {}
// SAFETY: AtomicU64 has the layout of u64.
unsafe impl Zeroed for AtomicU64 {}

/// `n` zeroed values, allocated with `alloc_zeroed` (the kernel's zero
/// pages until written), or an error if the memory cannot be had.
pub(crate) fn zeroed_vec<T: Zeroed>(n: usize) -> Result<Vec<T>, OutOfMemory> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = Layout::array::<T>(n).map_err(|_| OutOfMemory { bytes })?;
    // SAFETY: the layout has a non-zero size (n > 0, T is not zero-sized
    // for the types that implement Zeroed).
    let ptr = unsafe { alloc::alloc_zeroed(layout) }.cast::<T>();
    // An allocation that is freed unused may be optimised away, failure
    // included: the check must see the pointer the allocator gave.
    let ptr = std::hint::black_box(ptr);
    if ptr.is_null() {
        return Err(OutOfMemory { bytes });
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout
    // of `n` values of T, all of which are initialised (zero is valid for
    // T by the Zeroed contract); length and capacity are `n`.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// A fixed number of bits, each false or true.
///
/// The words hold each bit exclusive-or `inverted`: a set made all true
/// is stored as zeroed memory too, so it costs nothing until bits change,
/// however long it is. The stored bits past `len` stay zero.
#[derive(Debug)]
pub(crate) struct Bitset {
    words: Vec<u64>,
    len: usize,
    inverted: bool,
}

impl Bitset {
    /// `len` bits, all `value`; fails if the memory cannot be had.
    pub(crate) fn try_new(len: usize, value: bool) -> Result<Self, OutOfMemory> {
        Ok(Bitset {
            words: zeroed_vec::<u64>(len.div_ceil(64))?,
            len,
            inverted: value,
        })
    }

    /// A copy, itself lazily allocated: only the words that are not zero
    /// are written. Fails if the memory cannot be had.
    pub(crate) fn try_clone(&self) -> Result<Self, OutOfMemory> {
        let mut words = zeroed_vec::<u64>(self.words.len())?;
        for (to, &from) in words.iter_mut().zip(&self.words) {
            if from != 0 {
                *to = from;
            }
        }
        Ok(Bitset {
            words,
            len: self.len,
            inverted: self.inverted,
        })
    }

    /// The number of bits.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Word `i` as bits (`inverted` undone), bits past `len` false.
    fn word(&self, i: usize) -> u64 {
        let mut word = self.words[i];
        if self.inverted {
            word = !word;
            let used = self.len % 64;
            if i + 1 == self.words.len() && used != 0 {
                word &= (1u64 << used) - 1;
            }
        }
        word
    }

    /// Bit `i`.
    ///
    /// # Panics
    ///
    /// If `i` is not below the length.
    pub(crate) fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} of {}", self.len);
        (self.words[i / 64] & (1 << (i % 64)) != 0) != self.inverted
    }

    /// Sets bit `i` to `value`.
    ///
    /// # Panics
    ///
    /// If `i` is not below the length.
    pub(crate) fn set(&mut self, i: usize, value: bool) {
        assert!(i < self.len, "bit {i} of {}", self.len);
        if value != self.inverted {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The number of true bits.
    pub(crate) fn count_ones(&self) -> usize {
        let stored: usize = self.words.iter().map(|w| w.count_ones() as usize).sum();
        if self.inverted {
            self.len - stored
        } else {
            stored
        }
    }

    /// The number of bits true in both sets (of the same length).
    pub(crate) fn count_both(&self, other: &Bitset) -> usize {
        (0..self.words.len().min(other.words.len()))
            .map(|i| (self.word(i) & other.word(i)).count_ones() as usize)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_counts_and_tails() {
        let mut a = Bitset::try_new(130, true).unwrap();
        assert_eq!(a.count_ones(), 130);
        a.set(0, false);
        a.set(129, false);
        assert!(!a.get(129) && a.get(128));
        assert_eq!(a.count_ones(), 128);
        let mut b = Bitset::try_new(130, false).unwrap();
        b.set(1, true);
        b.set(129, true);
        assert_eq!(a.count_both(&b), 1);
        assert!(Bitset::try_new(0, true).unwrap().count_ones() == 0);
        assert!(Bitset::try_new(usize::MAX, false).is_err());
        // 1 TiB of bits cannot be had; 256 MiB can, and costs nothing
        // until written.
        assert_eq!(
            zeroed_vec::<u64>(1 << 37).unwrap_err().to_string(),
            "Cannot allocate 1099511627776 bytes of memory"
        );
        let big = Bitset::try_new(1 << 31, false).unwrap();
        assert_eq!(big.count_ones(), 0);
    }

    #[test]
    fn all_true_sets_and_their_copies() {
        let mut a = Bitset::try_new(130, true).unwrap();
        let b = Bitset::try_new(130, false).unwrap();
        assert!((0..130).all(|i| a.get(i)));
        assert_eq!(a.count_both(&a), 130);
        assert_eq!(a.count_both(&b), 0);
        a.set(64, false);
        a.set(64, true);
        a.set(3, false);
        let c = a.try_clone().unwrap();
        assert!(!c.get(3) && c.get(4) && c.get(64) && c.get(129));
        assert_eq!((c.count_ones(), c.count_both(&a)), (129, 129));
        let mut d = Bitset::try_new(130, false).unwrap();
        d.set(3, true);
        d.set(129, true);
        assert_eq!((a.count_both(&d), d.count_both(&a)), (1, 1));
        // 16 GiB of bits, all true, cost nothing until written.
        let big = Bitset::try_new(1 << 37, true).unwrap();
        assert!(big.get(0) && big.get((1 << 37) - 1));
    }
}
