//! Process-wide allocator tuning for encoding workloads.

/// Keeps large buffers in the heap instead of mapping and unmapping them for every tensor op: without this,
/// glibc returns each freed activation buffer to the kernel and the next op page-faults it back in (a
/// quarter of the CPU time of an encode went to the kernel). Call it once, early, before threads start
/// (the `latte` binary does it first thing). A no-op outside Linux with glibc.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: libc::c_int = -1;
        const M_MMAP_THRESHOLD: libc::c_int = -3;
        // SAFETY: mallopt only adjusts allocator parameters; it has no memory-safety preconditions.
        unsafe {
            libc::mallopt(M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
