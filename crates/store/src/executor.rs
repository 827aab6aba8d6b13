//! The store's threads: every component method runs on one long-lived compute thread; loads run
//! on a loader thread of their own.
//!
//! libtorch's CPU kernels parallelise with OpenMP (GNU libgomp in PyTorch's wheels). Each thread
//! that opens a parallel region gets a worker team of its own, kept for the thread's lifetime, and
//! once the process holds more team threads than CPUs libgomp stops letting idle workers spin: every
//! parallel region then pays a futex wake-up per worker. Component calls arriving on changing
//! threads (a gRPC server's blocking pool, concurrent requests) create exactly that situation. So
//! every call runs here, on one thread with one warm team. Measured on the 2-core bench machine, small
//! checkpoint at 64×64: a split-mode denoising step took 37 ms against 20 ms embedded when calls
//! ran on the server's threads (a UNet forward alone: 36 ms on a second thread with a live team
//! elsewhere, 21 ms without). Calls run in arrival order, so concurrent requests interleave step by
//! step; a GPU is fed from one thread the same way.
//!
//! The same holds for the threads of the process that are not the store's: in embedded mode the
//! orchestrator's request threads run the scheduler and image processing in this process, and
//! each of them opening a parallel region of its own made every step of the store slower after
//! the first img2img request (small checkpoint: 36 ms/step embedded against 22 ms/step split, where
//! the orchestrator is another process). So the compute thread fixes its team size first, before
//! anything else can change libtorch's process-wide default, and request threads run libtorch on
//! one thread ([`autopipe_store_api::single_threaded_kernels`]): their tensors are a few latents,
//! the UNet's are here.
//!
//! Loads (reading weight files, converting dtypes, placing on the device) run on the loader thread,
//! single-threaded in libtorch for the same reason, so that loading model B never holds up the
//! steps of a request on model A: they wait only for the cores, not for the queue.

use crate::{Code, StoreError};
use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Executor {
    name: String,
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// How an executor's thread runs libtorch's CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// With the process's intra-op thread count (`--threads`): the one OpenMP team.
    Team,
    /// On the thread alone ([`autopipe_store_api::single_threaded_kernels`]).
    Single,
}

impl Executor {
    /// Starts the thread `name`; it ends when the executor is dropped (after the calls queued
    /// before).
    pub(crate) fn new(name: &str, kernels: Kernels) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                match kernels {
                    // libtorch sizes a thread's team on its first parallel call, from the
                    // process-wide setting at that moment (what `--threads` set): take it now,
                    // before a request thread's `single_threaded_kernels` lowers that setting.
                    Kernels::Team => {
                        let _ = tch::get_num_threads();
                    }
                    Kernels::Single => autopipe_store_api::single_threaded_kernels(),
                }
                let _ = ready_tx.send(());
                for job in rx {
                    job();
                }
            })
            .unwrap_or_else(|e| panic!("spawning the store's {name} thread: {e}"));
        let _ = ready_rx.recv();
        Self {
            name: name.to_string(),
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on the executor's thread and waits for its result. `f` must not panic (callers catch
    /// libtorch panics themselves); if it does, the caller gets INTERNAL and the thread goes on.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(move || {
            let _ = tx.send(f());
        })?;
        rx.recv().map_err(|_| {
            StoreError::new(
                Code::Internal,
                format!("a component call panicked on the {} thread", self.name),
            )
        })
    }

    /// Queues `f` on the executor's thread without waiting for it: `f` answers through channels
    /// of its own (a panic drops them, which their receivers see).
    pub(crate) fn submit(&self, f: impl FnOnce() + Send + 'static) -> Result<(), StoreError> {
        let job: Job = Box::new(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // A model's first call on the CPU prepacks its weights (see autopipe_models::layers).
            if autopipe_models::layers::take_released_bytes() > 0 {
                crate::allocator::release_free_pages();
            }
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| {
                StoreError::new(
                    Code::Internal,
                    format!("the store's {} thread has stopped", self.name),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_call_on_one_thread_in_order() {
        let ex = Executor::new("test-executor", Kernels::Team);
        let ids: Vec<_> = (0..4)
            .map(|i| ex.run(move || (i, std::thread::current().id())).unwrap())
            .collect();
        assert!(ids.iter().all(|(_, id)| *id == ids[0].1));
        assert_ne!(ids[0].1, std::thread::current().id());
        assert_eq!(
            ids.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn a_panicking_call_is_an_error_and_the_thread_goes_on() {
        let ex = Executor::new("test-executor", Kernels::Single);
        let err = ex.run(|| -> u32 { panic!("boom") }).unwrap_err();
        assert_eq!(err.code, Code::Internal);
        assert_eq!(ex.run(|| 7).unwrap(), 7);
    }
}
