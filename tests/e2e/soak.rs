//! Soak: 8 concurrent clients × 50 mixed-task requests (text2img, img2img, inpaint on sd1-tiny,
//! 2 denoising steps) against the real store (on a Unix socket) and orchestrator. Zero failures, every image the same
//! as the same request alone (concurrency never leaks between requests), and the store's resident
//! bytes and lease count back to their baseline afterwards.

use autopipe_e2e::*;
use autopipe_proto::v1;
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 50;

/// The three tasks, each a reference case cut down to (at most) 2 denoising steps and without
/// classifier-free guidance (half the UNet work; the soak is about concurrency, not parity).
fn requests() -> Vec<(&'static str, v1::GenerateRequest)> {
    let mut t2i = reference_request("sd1_t2i_euler");
    t2i.num_inference_steps = Some(2);
    let mut i2i = reference_request("sd1_i2i_s060");
    i2i.num_inference_steps = Some(4); // strength 0.6 → 2 steps
    let mut inpaint = reference_request("sd1_inpaint_rect_s075");
    inpaint.num_inference_steps = Some(2); // strength 0.75 → 1 step
    let mut all = vec![("text2img", t2i), ("img2img", i2i), ("inpaint", inpaint)];
    for (_, r) in &mut all {
        r.guidance_scale = Some(1.0);
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn eight_clients_fifty_mixed_requests_each() {
    let m = format!("127.0.0.1:{}", free_port());
    // The store on a Unix socket, as deployed beside the orchestrator in one pod.
    let split = Split::start_unix(
        &[],
        &[
            "--max-concurrency",
            "4",
            "--max-queue",
            "64",
            "--metrics-listen",
            &m,
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = split.orchestrator.address.clone();
    let tasks = requests();

    // Warm-up: load everything once and keep each task's image as the expected answer.
    let expected: Vec<Vec<u8>> = tasks
        .iter()
        .map(|(name, req)| {
            let resp =
                rt.block_on(async { orchestrator_client(&addr).await.generate(req.clone()).await });
            resp.unwrap_or_else(|e| panic!("warm-up {name}: {e:?}"))
                .into_inner()
                .images[0]
                .png
                .clone()
        })
        .collect();
    let baseline = split.stats();
    assert_eq!(baseline.active_leases, 0);
    println!(
        "baseline: {} bytes resident in {} components",
        baseline.resident_bytes,
        baseline.components.len()
    );

    let started = Instant::now();
    let results = rt.block_on(async {
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let addr = addr.clone();
            let tasks = tasks.clone();
            clients.push(tokio::spawn(async move {
                let mut client = orchestrator_client(&addr).await;
                let mut out = Vec::with_capacity(REQUESTS_PER_CLIENT);
                for i in 0..REQUESTS_PER_CLIENT {
                    // Each client walks the tasks from a different offset, so all three always mix.
                    let which = (c + i) % tasks.len();
                    let t = Instant::now();
                    let r = client.generate(tasks[which].1.clone()).await;
                    out.push((
                        which,
                        t.elapsed(),
                        r.map(|r| {
                            r.into_inner()
                                .images
                                .into_iter()
                                .map(|i| i.png)
                                .collect::<Vec<_>>()
                        }),
                    ));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for c in clients {
            all.extend(c.await.expect("client task"));
        }
        all
    });
    let wall = started.elapsed();

    let mut failures = Vec::new();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut per_task = [0usize; 3];
    for (which, took, r) in &results {
        match r {
            Ok(images) if images.len() == 1 && images[0] == expected[*which] => {
                latencies.push(*took);
                per_task[*which] += 1;
            }
            Ok(_) => failures.push(format!("{}: a different image than alone", tasks[*which].0)),
            Err(e) => failures.push(format!(
                "{}: {:?} {}",
                tasks[*which].0,
                e.code(),
                e.message()
            )),
        }
    }
    latencies.sort();
    let n = results.len();
    println!(
        "soak: {n} requests ({} text2img, {} img2img, {} inpaint) from {CLIENTS} clients in {:.2} s = {:.1} requests/s; latency p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; {} failures",
        per_task[0],
        per_task[1],
        per_task[2],
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.95).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        failures.len()
    );
    assert_eq!(n, CLIENTS * REQUESTS_PER_CLIENT);
    assert!(
        failures.is_empty(),
        "{} failures, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    let after = split.stats();
    println!(
        "after: {} bytes resident, {} leases",
        after.resident_bytes, after.active_leases
    );
    assert_eq!(after.active_leases, 0, "leases left behind");
    assert_eq!(
        after.resident_bytes, baseline.resident_bytes,
        "resident bytes changed"
    );
    assert!(
        after.components.iter().all(|c| c.load_count == 1),
        "a component was loaded twice"
    );

    let text = scrape(&m);
    assert_eq!(
        metric_sum(&text, "autopipe_requests_total", &["status=\"ok\""]) as usize,
        n + tasks.len()
    );
    assert_eq!(metric(&text, "autopipe_requests_in_flight"), 0.0);
    assert_eq!(metric(&text, "autopipe_queue_depth"), 0.0);
    if let autopipe_proto::transport::Address::Unix(path) = &split.store.address {
        let _ = std::fs::remove_file(path);
    }
}
