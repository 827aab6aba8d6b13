//! How the threads of a process that hosts a store share libtorch's CPU kernels.

/// Makes libtorch run single-threaded on the calling thread (once per thread): for threads that
/// only prepare a request's small tensors beside a store's compute thread in the same process, so
/// they never open an OpenMP team of their own (the store's `executor.rs` records
/// the measurement).
pub fn single_threaded_kernels() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if !done.get() {
            // The first call sizes this thread's team from the process-wide setting; the second
            // sets it (and that setting) to one.
            let _ = tch::get_num_threads();
            tch::set_num_threads(1);
            done.set(true);
        }
    });
}
