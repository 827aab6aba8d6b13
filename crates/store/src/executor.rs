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
//! steps of a request on model A in the queue. Nor on the cores: the loader thread runs at a lower
//! CPU priority (`--load-nice`, default [`crate::DEFAULT_LOAD_NICE`]). An OpenMP region ends when
//! its slowest worker does, so a loader taking turns with one worker of the team stalls every
//! worker (the bench's "load interference" row measures a running request's steps while another
//! model loads, at this priority and at the compute thread's own: bench/README.md). Lower, it gets
//! the cores the team leaves (between regions, between requests; on an idle store a load with
//! nothing else running takes as long as before).

use crate::{Code, StoreError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct Executor {
    name: String,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Jobs submitted that have not started yet.
    backlog: Arc<AtomicUsize>,
}

/// How an executor's thread runs libtorch's CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// With the process's intra-op thread count (`--threads`): the one OpenMP team.
    Team,
    /// On the thread alone ([`autopipe_store_api::single_threaded_kernels`]), `nice` steps below
    /// the process's CPU priority (0: the same).
    Single { nice: i32 },
}

/// Lowers the calling thread's CPU priority by `nice` steps (Linux: a thread id names one
/// thread); raising a nice value needs no privilege. Returns the thread's nice value after.
fn lower_priority(nice: i32) -> i32 {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if nice > 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19));
        }
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
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
                    Kernels::Single { nice } => {
                        autopipe_store_api::single_threaded_kernels();
                        let now = lower_priority(nice);
                        tracing::debug!(nice = now, "loader thread CPU priority");
                    }
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
            backlog: Arc::default(),
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
        let backlog = self.backlog.clone();
        let job: Job = Box::new(move || {
            backlog.fetch_sub(1, Ordering::SeqCst);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // A call may prepack weights that loading left plain (1×1 convolutions: see
            // autopipe_models::layers).
            if autopipe_models::layers::take_released_bytes() > 0 {
                crate::allocator::release_free_pages();
            }
        });
        self.backlog.fetch_add(1, Ordering::SeqCst);
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| {
                self.backlog.fetch_sub(1, Ordering::SeqCst);
                StoreError::new(
                    Code::Internal,
                    format!("the store's {} thread has stopped", self.name),
                )
            })
    }
}

impl Executor {
    /// The count of jobs queued behind the running one (shared: a job can watch it).
    pub(crate) fn backlog(&self) -> Arc<AtomicUsize> {
        self.backlog.clone()
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
        let ex = Executor::new("test-executor", Kernels::Single { nice: 0 });
        let err = ex.run(|| -> u32 { panic!("boom") }).unwrap_err();
        assert_eq!(err.code, Code::Internal);
        assert_eq!(ex.run(|| 7).unwrap(), 7);
    }

    #[test]
    fn a_single_kernel_thread_runs_below_the_process_priority() {
        let own = lower_priority(0);
        let ex = Executor::new("test-loader", Kernels::Single { nice: 7 });
        assert_eq!(ex.run(|| lower_priority(0)).unwrap(), (own + 7).min(19));
        // The caller's own priority is untouched.
        assert_eq!(lower_priority(0), own);
    }
}
