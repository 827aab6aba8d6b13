//! Step-level batching over real gRPC: concurrent Generate requests on sd1-tiny, each with its own
//! scheduler (timesteps), seed and guidance (one without CFG: one row per call instead of two),
//! run their UNet steps (and their text-encoder calls) as joined forwards in an
//! `autopipe-store --max-batch`, and every image equals the same request's image run alone
//! (PSNR ≥ 60 dB, printed); the store's metrics count the joined forwards.

use autopipe_e2e::*;
use autopipe_proto::v1;

/// Four requests with the same number of UNet calls (6 steps) at 64×64: their calls join.
fn requests() -> Vec<v1::GenerateRequest> {
    let mut no_cfg = reference_request("sd1_t2i_no_cfg");
    // Its own scheduler is PNDM (one UNet call more than the steps); Euler keeps it in step.
    no_cfg.scheduler = "EulerDiscreteScheduler".into();
    let mut all = vec![
        reference_request("sd1_t2i_euler"),
        reference_request("sd1_t2i_ddim"),
        reference_request("sd1_t2i_euler_a"),
        no_cfg,
    ];
    for (i, r) in all.iter_mut().enumerate() {
        assert_eq!(r.num_inference_steps, Some(6));
        r.seed = Some(100 + i as u64);
    }
    all
}

#[test]
fn concurrent_requests_share_unet_forwards_and_keep_their_images() {
    let reqs = requests();
    let n = reqs.len();
    let m = format!("127.0.0.1:{}", free_port());
    // A generous window: the calls of one step wait for each other (see the extra lease below),
    // so the test never depends on how the requests happen to be scheduled.
    let split = Split::start_with(
        &[
            "--max-batch",
            &n.to_string(),
            "--batch-window-ms",
            "120000",
            "--metrics-listen",
            &m,
        ],
        &["--max-concurrency", &n.to_string()],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = split.orchestrator.address.clone();
    let generate = |req: v1::GenerateRequest| {
        let addr = addr.clone();
        async move {
            orchestrator_client(&addr)
                .await
                .generate(req)
                .await
                .map(|r| decode(&r.into_inner().images[0]))
        }
    };

    // Alone: one request at a time never waits (it is the only lease on the UNet) or joins.
    let alone: Vec<image::RgbImage> = reqs
        .iter()
        .map(|r| rt.block_on(generate(r.clone())).expect("request alone"))
        .collect();
    let forwards = |text: &str| metric(text, "autopipe_store_batched_forwards_total");
    let calls = |text: &str| metric(text, "autopipe_store_batched_calls_total");
    let text = scrape(&m);
    assert_eq!((forwards(&text), calls(&text)), (0.0, 0.0), "{text}");

    // One lease more on the UNet than there are requests until all of them hold theirs: the calls
    // of the requests that start first wait for the late ones (a job waits while fewer calls are
    // queued than min(--max-batch, leases) and nothing else is queued on the compute thread),
    // however late those start. Then it is released, so that no call waits for it.
    let unet = fixtures()
        .join("checkpoints/sd1-tiny/unet")
        .canonicalize()
        .unwrap();
    let store_addr = split.store.address.clone();
    let held = rt
        .block_on(async {
            store_client(&store_addr)
                .await
                .acquire(v1::AcquireRequest {
                    components: vec![v1::ComponentRequest {
                        name: "unet".into(),
                        class_name: "UNet2DConditionModel".into(),
                        path: unet.display().to_string(),
                        variant: String::new(),
                        upcast_half: false,
                    }],
                    dtype: String::new(),
                    request_id: "batching-test".into(),
                })
                .await
        })
        .expect("acquire the UNet")
        .into_inner();

    let together: Vec<image::RgbImage> = rt.block_on(async {
        let tasks: Vec<_> = reqs
            .iter()
            .map(|r| tokio::spawn(generate(r.clone())))
            .collect();
        let all_leased = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut store = store_client(&store_addr).await;
        while store
            .stats(v1::StatsRequest {})
            .await
            .expect("store Stats")
            .into_inner()
            .active_leases
            < n as u32 + 1
        {
            assert!(
                std::time::Instant::now() < all_leased,
                "the requests did not all acquire their leases"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        store
            .release(v1::ReleaseRequest {
                lease_id: held.lease_id.clone(),
            })
            .await
            .expect("release");
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().expect("concurrent request"));
        }
        out
    });

    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let db = psnr(a, b);
        println!(
            "request {i} ({}): batched vs alone PSNR {db:.1} dB",
            reqs[i].scheduler
        );
        assert!(db >= 60.0, "request {i}: {db:.1} dB");
    }
    // Different requests, different images: the rows went back to their own callers.
    assert!(psnr(&together[0], &together[1]) < 40.0);
    // The steps ran as joined forwards. Usually every one of the 6 steps is one forward of all four
    // requests' calls, and so are their text-encoder calls (7 joinable calls per request); a call
    // whose job finds another call queued behind it runs with the partners already there instead
    // of holding that call up (the requests then join one step apart), so the count is bounded,
    // not exact.
    let text = scrape(&m);
    println!(
        "batched forwards {}, calls in them {} (of {} joinable calls)",
        forwards(&text),
        calls(&text),
        7 * n
    );
    assert!(forwards(&text) >= 3.0, "{text}");
    assert!(calls(&text) >= 3.0 * n as f64, "{text}");
    assert!(calls(&text) <= 7.0 * n as f64, "{text}");
    assert_eq!(split.stats().active_leases, 0, "no lease left behind");
}
