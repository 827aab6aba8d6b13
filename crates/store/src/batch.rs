//! Step-level batching ("continuous batching" for diffusion): calls to the same component method
//! whose inputs differ only in their batch dimension are joined along dim 0 into one forward, the
//! way LLM servers batch decode steps.
//!
//! Concurrent requests on one model each call the UNet once per denoising step, with their own
//! latents, timestep, scheduler and generator. Each call still enters the compute thread's queue
//! (see `executor`) as a job; the job first takes every waiting call with the same [`Signature`]
//! (up to `max_batch`), concatenates their inputs along dim 0, runs one forward and splits the
//! outputs back to their callers. A request therefore joins the batch at whatever step it is at and
//! leaves it when its loop ends; its rows never mix with another's (CFG's two halves stay next to
//! each other inside one call's rows). Calls whose inputs differ (another size, dtype, conditioning
//! set) have another signature and run in their own forward.
//!
//! Which methods may be joined is declared by the component class
//! (`ComponentClass::BATCHED`): every input is per row along dim 0, or a single value shared by the
//! call's rows (a scalar timestep), which is expanded to the call's rows before joining; every
//! output is per row. A call that fits neither (an input with another dim 0) simply runs alone.
//!
//! Waiting for partners: a job that finds fewer calls queued than requests that may be about to
//! make the same call waits up to `window` for them, so that requests which drifted apart by a
//! scheduler step fall back into one forward; a lone request never waits. The store counts those
//! requests from the leases on the component: every lease whose request has not made a call of
//! that method yet, or whose latest call had the same signature (in its denoising loop, between two
//! steps); not one whose request has moved on (decoding after its loop, or calling with another
//! signature), which would make every step wait out the window for a call that never comes.
//! It waits on the compute thread, so it stops waiting as soon as any other job is queued there
//! (another model's call, or a partner's text-encoder call that its UNet call needs first): a
//! waiting join never holds up work the thread could be doing.
//!
//! A joined forward that fails is not allowed to take its partners down with it: each call then
//! runs alone and gets its own result or its own error.

use crate::{Code, StoreError, Tensors};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// What makes calls joinable: the same component (by address: a queued call holds it resident),
/// method, and per input its name, dtype, device and shape past dim 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Signature {
    component: usize,
    method: String,
    inputs: Vec<(String, Kind, Device, Vec<i64>)>,
}

impl Signature {
    /// The component's address.
    pub fn component(&self) -> usize {
        self.component
    }

    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The signature of a call with `rows` rows, or `None` when an input is neither per row nor a
    /// single shared value (the call then runs alone).
    pub fn of(component: usize, method: &str, inputs: &Tensors) -> Option<(Self, i64)> {
        let rows = inputs
            .iter()
            .find(|(_, t)| t.dim() >= 2)
            .map(|(_, t)| t.size()[0])?;
        let mut sig = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            let size = t.size();
            let per_row = match size[..] {
                // One value for every row (diffusers' UNet expands a scalar timestep).
                [] | [1] => vec![],
                [first, ..] if first == rows => size[1..].to_vec(),
                _ => return None,
            };
            sig.push((name.clone(), t.kind(), t.device(), per_row));
        }
        sig.sort_by(|a, b| a.0.cmp(&b.0));
        Some((
            Self {
                component,
                method: method.to_string(),
                inputs: sig,
            },
            rows,
        ))
    }
}

/// A call waiting to be joined.
struct Pending {
    inputs: Tensors,
    rows: i64,
    /// Requests that may be about to make a call with the same signature when this one came in,
    /// itself included (the store counts them from their leases): how many calls could join it.
    partners: usize,
    reply: mpsc::SyncSender<Result<Tensors, StoreError>>,
}

/// The answer to a queued call.
pub(crate) type Reply = mpsc::Receiver<Result<Tensors, StoreError>>;

/// The calls waiting to be joined, by signature, and what joining has done so far.
pub(crate) struct Batcher {
    max_batch: usize,
    window: Duration,
    queues: Mutex<HashMap<Signature, VecDeque<Pending>>>,
    arrived: Condvar,
    /// By signature: jobs queued on the compute thread for calls enqueued here, not started yet.
    jobs: Mutex<HashMap<Signature, usize>>,
    forwards: AtomicU64,
    calls: AtomicU64,
}

/// Joined forwards since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Forwards that joined two calls or more.
    pub batched_forwards: u64,
    /// Calls those forwards joined (÷ `batched_forwards` = mean batch size).
    pub batched_calls: u64,
}

impl Batcher {
    /// Joins up to `max_batch` calls (1 = never), waiting up to `window` for partners.
    pub fn new(max_batch: usize, window: Duration) -> Self {
        Self {
            max_batch: max_batch.max(1),
            window,
            queues: Mutex::default(),
            arrived: Condvar::new(),
            jobs: Mutex::default(),
            forwards: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        }
    }

    /// Whether calls are ever joined.
    pub fn enabled(&self) -> bool {
        self.max_batch > 1
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<Signature, VecDeque<Pending>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<Signature, usize>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a call; a [`Batcher::run`] job for `signature`, which the caller queues on the
    /// compute thread next, answers it.
    pub fn enqueue(
        &self,
        signature: Signature,
        inputs: Tensors,
        rows: i64,
        partners: usize,
    ) -> Reply {
        let (reply, rx) = mpsc::sync_channel(1);
        *self.jobs().entry(signature.clone()).or_default() += 1;
        self.queues()
            .entry(signature)
            .or_default()
            .push_back(Pending {
                inputs,
                rows,
                partners,
                reply,
            });
        self.arrived.notify_all();
        rx
    }

    /// Calls queued now (all signatures).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queues().values().map(VecDeque::len).sum()
    }

    /// Joined forwards so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            batched_forwards: self.forwards.load(Ordering::Relaxed),
            batched_calls: self.calls.load(Ordering::Relaxed),
        }
    }

    /// Takes the calls of one forward: the oldest queued with `signature`, after waiting (up to the
    /// window) while fewer are queued than could come and the compute thread has nothing else
    /// queued (`backlog`: its queued jobs, ours among them).
    fn take(&self, signature: &Signature, backlog: &AtomicUsize) -> Vec<Pending> {
        // How often a waiting job looks at the compute thread's queue.
        const POLL: Duration = Duration::from_millis(1);
        let deadline = Instant::now() + self.window;
        let mut queues = self.queues();
        loop {
            let Some(queue) = queues.get(signature) else {
                return Vec::new();
            };
            let partners = queue.iter().map(|p| p.partners).max().unwrap_or(1);
            let want = partners.min(self.max_batch);
            let now = Instant::now();
            // Queued jobs that are not this signature's own (its partners' calls each queue one).
            let ours = self.jobs().get(signature).copied().unwrap_or(0);
            let other_work = backlog.load(Ordering::SeqCst) > ours;
            if queue.len() >= want || now >= deadline || other_work {
                break;
            }
            queues = self
                .arrived
                .wait_timeout(queues, (deadline - now).min(POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let Some(queue) = queues.get_mut(signature) else {
            return Vec::new();
        };
        let n = queue.len().min(self.max_batch);
        let calls: Vec<Pending> = queue.drain(..n).collect();
        if queue.is_empty() {
            queues.remove(signature);
        }
        calls
    }

    /// On the compute thread: runs the queued calls with `signature` (none if an earlier job took
    /// them) through `call`, joined when there are several. `backlog` counts the jobs queued on
    /// the compute thread behind this one.
    pub fn run(
        &self,
        signature: &Signature,
        call: &dyn Fn(&Tensors) -> Result<Tensors, StoreError>,
        backlog: &AtomicUsize,
    ) {
        {
            let mut jobs = self.jobs();
            if let Some(n) = jobs.get_mut(signature) {
                *n -= 1;
                if *n == 0 {
                    jobs.remove(signature);
                }
            }
        }
        let calls = self.take(signature, backlog);
        if calls.len() > 1 {
            let sizes: Vec<i64> = calls.iter().map(|c| c.rows).collect();
            let outputs = join(&calls)
                .and_then(|joined| call(&joined))
                .and_then(|out| split(out, &sizes));
            if let Ok(outputs) = outputs {
                self.forwards.fetch_add(1, Ordering::Relaxed);
                self.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
                for (c, out) in calls.into_iter().zip(outputs) {
                    let _ = c.reply.send(Ok(out));
                }
                return;
            }
            // Fall through: each call alone, with its own result or error.
        }
        for c in calls {
            let _ = c.reply.send(call(&c.inputs));
        }
    }
}

/// The calls' inputs concatenated along dim 0, shared values expanded to each call's rows first.
fn join(calls: &[Pending]) -> Result<Tensors, StoreError> {
    let torch = |e: tch::TchError| StoreError::new(Code::Internal, e.to_string());
    let mut joined = Tensors::with_capacity(calls[0].inputs.len());
    for (name, _) in &calls[0].inputs {
        let mut parts = Vec::with_capacity(calls.len());
        for c in calls {
            let t = c
                .inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| StoreError::new(Code::Internal, format!("no input {name:?}")))?;
            parts.push(if t.dim() <= 1 && t.numel() == 1 {
                t.f_reshape([1])
                    .and_then(|t| t.f_expand([c.rows], false))
                    .map_err(torch)?
            } else {
                t.shallow_clone()
            });
        }
        joined.push((name.clone(), Tensor::f_cat(&parts, 0).map_err(torch)?));
    }
    Ok(joined)
}

/// A joined forward's outputs, split back into each call's rows.
fn split(outputs: Tensors, sizes: &[i64]) -> Result<Vec<Tensors>, StoreError> {
    let total: i64 = sizes.iter().sum();
    let mut per_call: Vec<Tensors> = sizes.iter().map(|_| Vec::new()).collect();
    for (name, t) in outputs {
        if t.dim() == 0 || t.size()[0] != total {
            return Err(StoreError::new(
                Code::Internal,
                format!("output {name:?} is not per row ({:?})", t.size()),
            ));
        }
        for (out, part) in per_call.iter_mut().zip(t.split_with_sizes(sizes, 0)) {
            out.push((name.clone(), part));
        }
    }
    Ok(per_call)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOAT: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn call(rows: i64, t: f32) -> Tensors {
        vec![
            ("sample".into(), Tensor::randn([rows, 4, 2, 2], FLOAT)),
            ("timestep".into(), Tensor::from(t)),
        ]
    }

    #[test]
    fn signatures_join_what_differs_only_in_rows() {
        let (a, rows_a) = Signature::of(1, "forward", &call(2, 10.0)).unwrap();
        let (b, rows_b) = Signature::of(1, "forward", &call(4, 20.0)).unwrap();
        assert_eq!((a == b, rows_a, rows_b), (true, 2, 4));
        let (other_component, _) = Signature::of(2, "forward", &call(2, 10.0)).unwrap();
        assert_ne!(a, other_component);
        let mut wider = call(2, 10.0);
        wider[0].1 = Tensor::randn([2, 4, 2, 3], FLOAT);
        assert_ne!(a, Signature::of(1, "forward", &wider).unwrap().0);
        let mut half = call(2, 10.0);
        half[0].1 = half[0].1.to_kind(Kind::Half);
        assert_ne!(a, Signature::of(1, "forward", &half).unwrap().0);
        // A timestep per row joins calls with a scalar one.
        let mut per_row = call(2, 10.0);
        per_row[1].1 = Tensor::from_slice(&[1.0f32, 2.0]);
        assert_eq!(a, Signature::of(1, "forward", &per_row).unwrap().0);
        // Neither per row nor shared: runs alone.
        let mut odd = call(2, 10.0);
        odd[1].1 = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert!(Signature::of(1, "forward", &odd).is_none());
    }

    #[test]
    fn joined_calls_get_their_own_rows_back_and_a_failing_join_runs_them_alone() {
        let batcher = Batcher::new(4, Duration::ZERO);
        let inputs = [call(2, 10.0), call(1, 20.0), call(2, 30.0)];
        let (sig, _) = Signature::of(1, "forward", &inputs[0]).unwrap();
        let replies: Vec<Reply> = inputs
            .iter()
            .map(|i| {
                let rows = i[0].1.size()[0];
                let copy = i.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
                batcher.enqueue(sig.clone(), copy, rows, 3)
            })
            .collect();
        // sample * timestep: each row must see its own call's timestep.
        let seen = Mutex::new(Vec::new());
        let forward = |i: &Tensors| -> Result<Tensors, StoreError> {
            seen.lock().unwrap().push(i[0].1.size()[0]);
            let t = &i[1].1;
            let t = if t.dim() == 0 {
                t.reshape([1])
            } else {
                t.shallow_clone()
            };
            Ok(vec![("sample".into(), &i[0].1 * t.view([-1, 1, 1, 1]))])
        };
        batcher.run(&sig, &forward, &AtomicUsize::new(0));
        assert_eq!(*seen.lock().unwrap(), vec![5]);
        for (reply, input) in replies.iter().zip(&inputs) {
            let out = reply.recv().unwrap().unwrap();
            let t = f64::try_from(&input[1].1).unwrap();
            let expected = &input[0].1 * t;
            assert!(out[0].1.allclose(&expected, 0.0, 0.0, false));
        }
        assert_eq!(
            batcher.stats(),
            BatchStats {
                batched_forwards: 1,
                batched_calls: 3
            }
        );

        // A join the component rejects: every call runs alone and hears its own outcome.
        let replies: Vec<Reply> = inputs
            .iter()
            .map(|i| {
                let rows = i[0].1.size()[0];
                let copy = i.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
                batcher.enqueue(sig.clone(), copy, rows, 3)
            })
            .collect();
        let picky = |i: &Tensors| -> Result<Tensors, StoreError> {
            match i[0].1.size()[0] {
                1 => Err(StoreError::new(Code::InvalidArgument, "one row")),
                2 => Ok(vec![("sample".into(), i[0].1.shallow_clone())]),
                n => Err(StoreError::new(Code::Internal, format!("{n} rows"))),
            }
        };
        batcher.run(&sig, &picky, &AtomicUsize::new(0));
        let codes: Vec<Result<i64, Code>> = replies
            .iter()
            .map(|r| match r.recv().unwrap() {
                Ok(out) => Ok(out[0].1.size()[0]),
                Err(e) => Err(e.code),
            })
            .collect();
        assert_eq!(codes, vec![Ok(2), Err(Code::InvalidArgument), Ok(2)]);
        assert_eq!(batcher.stats().batched_forwards, 1);
        assert_eq!(batcher.queued(), 0);
    }

    #[test]
    fn a_waiting_join_stops_waiting_when_other_work_is_queued() {
        // A window far longer than the test: only other work may end the wait.
        let batcher = Batcher::new(4, Duration::from_secs(3600));
        let (sig, _) = Signature::of(1, "forward", &call(1, 1.0)).unwrap();
        let reply = batcher.enqueue(sig.clone(), call(1, 1.0), 1, 4);
        let forward = |i: &Tensors| -> Result<Tensors, StoreError> {
            Ok(vec![("sample".into(), i[0].1.shallow_clone())])
        };
        // Its own job started (nothing else queued): it waits for 3 partners; a partner's call
        // and job arrive, then a job of another kind (a text encoder's call).
        let backlog = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let job = s.spawn(|| batcher.run(&sig, &forward, &backlog));
            let partner = batcher.enqueue(sig.clone(), call(1, 2.0), 1, 4);
            backlog.fetch_add(1, Ordering::SeqCst); // the partner's own job
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !job.is_finished(),
                "waits while only its partners' jobs are queued"
            );
            backlog.fetch_add(1, Ordering::SeqCst); // another call's job
            job.join().unwrap();
            assert_eq!(partner.recv().unwrap().unwrap()[0].1.size(), [1, 4, 2, 2]);
        });
        assert_eq!(reply.recv().unwrap().unwrap()[0].1.size(), [1, 4, 2, 2]);
        assert_eq!(batcher.stats().batched_calls, 2);
    }

    #[test]
    fn at_most_max_batch_calls_join_and_the_rest_wait_for_the_next_job() {
        let batcher = Batcher::new(2, Duration::ZERO);
        let (sig, _) = Signature::of(1, "forward", &call(1, 1.0)).unwrap();
        let replies: Vec<Reply> = (0..3)
            .map(|i| batcher.enqueue(sig.clone(), call(1, i as f32), 1, 3))
            .collect();
        let sizes = Mutex::new(Vec::new());
        let forward = |i: &Tensors| -> Result<Tensors, StoreError> {
            sizes.lock().unwrap().push(i[0].1.size()[0]);
            Ok(vec![("sample".into(), i[0].1.shallow_clone())])
        };
        batcher.run(&sig, &forward, &AtomicUsize::new(0));
        assert_eq!(batcher.queued(), 1);
        batcher.run(&sig, &forward, &AtomicUsize::new(0));
        batcher.run(&sig, &forward, &AtomicUsize::new(0)); // an earlier job took its call: nothing to do
        assert_eq!(*sizes.lock().unwrap(), vec![2, 1]);
        assert!(replies.iter().all(|r| r.recv().unwrap().is_ok()));
    }
}
