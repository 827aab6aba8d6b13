//! Threads of an embedded process (`autopipe serve`, `generate --embedded`): the store's compute
//! thread owns libtorch's one OpenMP team; the orchestrator's request threads, which run the
//! scheduler and image processing in the same process, never open a team of their own. A second
//! team made every later denoising step slower (36 against 22 ms/step on the small checkpoint,
//! `crates/store/src/executor.rs`); this checks the cause, not a timing.

use autopipe_e2e::{reference_request, Silent};
use autopipe_orchestrator::{Orchestrator, OrchestratorConfig};
use autopipe_store::{Store, StoreConfig};
use std::sync::Arc;

/// Live threads of this process whose name is `name` (Linux gives a new thread its creator's
/// name, so an OpenMP team's workers carry the name of the thread that opened it). A thread that
/// was joined may still be listed for a moment while it exits (state Z or X): not counted.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // `pid (comm) state …`: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some((comm, state))
        })
        .filter(|(comm, state)| comm.trim_end() == name && !matches!(state.as_str(), "Z" | "X"))
        .count()
}

#[test]
fn request_threads_open_no_openmp_team_of_their_own() {
    // Two intra-op threads whatever this machine has: a team has a worker to show.
    tch::set_num_threads(2);
    let orchestrator = Arc::new(Orchestrator::new(
        Arc::new(Store::new(StoreConfig::default())),
        OrchestratorConfig::default(),
    ));
    // The first request also starts pools that live for the process (the tokenizers crate's
    // rayon threads take the name of the thread that first needs them): let a warm-up start them.
    let o = orchestrator.clone();
    std::thread::Builder::new()
        .name("warm-up".into())
        .spawn(move || o.generate(&reference_request("sd1_t2i_pndm"), "warm-up", &Silent))
        .expect("spawn")
        .join()
        .expect("warm-up thread")
        .expect("warm-up request");
    for (i, case) in [
        "sd1_t2i_pndm",
        "sd1_i2i_s060",
        "sd1_inpaint_soft_s075",
        "sd1_t2i_batch2",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("request-{i}");
        let o = orchestrator.clone();
        let thread_name = name.clone();
        let same_name = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                o.generate(&reference_request(case), case, &Silent)
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                threads_named(&thread_name)
            })
            .expect("spawn")
            .join()
            .expect("request thread");
        println!("{case}: threads named {name:?} after the request: {same_name}");
        assert_eq!(
            same_name,
            1,
            "{case}: the request thread opened an OpenMP team ({} workers)",
            same_name - 1
        );
    }
    // The compute thread and its own team (`autopipe-compute`, cut to 15 bytes by Linux).
    let compute = threads_named("autopipe-comput");
    println!("compute thread and its team: {compute}");
    assert!((1..=2).contains(&compute), "{compute} compute threads");
}
