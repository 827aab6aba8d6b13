//! The store's compute thread: every component method runs on one long-lived thread.
//!
//! libtorch's CPU kernels parallelise with OpenMP (GNU libgomp in PyTorch's wheels). Each thread
//! that opens a parallel region gets a worker team of its own, kept for the thread's lifetime, and
//! once the process holds more team threads than CPUs libgomp stops letting idle workers spin: every
//! parallel region then pays a futex wake-up per worker. Component calls arriving on changing
//! threads (a gRPC server's blocking pool, concurrent requests) create exactly that situation. So
//! every call and every load runs here, on one thread with one warm team. Measured on the 2-core bench machine, small
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
//! one thread ([`autopipe_store_api::single_threaded_kernels`]): their tensors are a few latents, the UNet's are here.

use crate::{Code, StoreError};
use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Executor {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Executor {
    /// Starts the thread; it ends when the executor is dropped (after the calls queued before).
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("autopipe-compute".into())
            .spawn(move || {
                // libtorch sizes a thread's team on its first parallel call, from the process-wide
                // setting at that moment (what `--threads` set): take it now, before a request
                // thread's `single_threaded_kernels` lowers that setting.
                let _ = ready_tx.send(tch::get_num_threads());
                for job in rx {
                    job();
                }
            })
            .expect("spawning the store's compute thread");
        let _ = ready_rx.recv();
        Self {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on the compute thread and waits for its result. `f` must not panic (callers catch
    /// libtorch panics themselves); if it does, the caller gets INTERNAL and the thread goes on.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            if let Ok(out) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(out);
            }
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| {
                StoreError::new(Code::Internal, "the store's compute thread has stopped")
            })?;
        rx.recv().map_err(|_| {
            StoreError::new(
                Code::Internal,
                "a component call panicked on the compute thread",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_call_on_one_thread_in_order() {
        let ex = Executor::new();
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
        let ex = Executor::new();
        let err = ex.run(|| -> u32 { panic!("boom") }).unwrap_err();
        assert_eq!(err.code, Code::Internal);
        assert_eq!(ex.run(|| 7).unwrap(), 7);
    }
}
