//! Process-wide malloc settings for a process that runs libtorch on the CPU.
//!
//! libtorch's CPU allocator is plain `malloc`. With glibc's defaults every activation above the
//! mmap threshold (at most 32 MiB; a Stable Diffusion 1.5 UNet step at 256×256 allocates many of
//! 10–80 MiB) is a fresh `mmap`, zero-filled page by page on first touch and unmapped when freed:
//! the same pages are faulted in again on every step. Keeping freed memory in the heap instead
//! makes the next step reuse it. Measured on the 2-core bench machine (SD 1.5 architecture UNet,
//! batch 2, 32×32 latents, fp32): 2645 ms per forward with glibc's defaults, 2280 ms with this.
//! The cost: memory freed by the process is kept for reuse rather than returned to the system,
//! so RSS stays at its high-water mark (for a store, resident weights plus the largest step).

/// Applies the settings: no `mmap` for large blocks, one arena for every thread (large blocks
/// then come from the main heap, which can grow past a thread arena's 64 MiB), and the heap's top
/// trimmed only past 2 GiB of free space. Call once at process start, before libtorch allocates.
pub fn tune_for_libtorch() {
    // SAFETY: mallopt only changes glibc's allocation policy; valid parameters and values.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Hands the heap's free pages back to the system (glibc's `malloc_trim`), wherever they are in
/// the heap. For memory that will not be asked for again the way activations are: the plain
/// weights that oneDNN prepacking released (`autopipe_models::layers`), which would otherwise
/// stay in RSS beside their packed copies (SD 1.5 UNet fp32: +0.9–1.4 GiB).
pub fn release_free_pages() {
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
