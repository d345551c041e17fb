//! Cache prefetch hints.

/// Asks the CPU to load every cache line of `bytes` into L1 (a hint with no effect on results; nothing off
/// x86-64).
#[inline]
pub fn prefetch_lines(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        // SAFETY: prefetching is a hint with no memory effect; the address is inside `bytes`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                bytes.as_ptr().add(off) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefetching_any_slice_is_harmless() {
        let v: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        for range in [0..0, 0..1, 3..130, 0..1000] {
            super::prefetch_lines(&v[range]);
        }
        assert_eq!(v[999], (999u32 % 256) as u8);
    }
}
