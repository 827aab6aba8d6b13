//! The store as a resource manager, end to end with the real binaries on loopback: a memory budget
//! smaller than two models evicts the least recently used one, refuses (RESOURCE_EXHAUSTED) when
//! everything resident is leased, counts identical components once, and its Prometheus endpoint
//! shows the counters moving.

use autopipe_e2e::*;
use autopipe_proto::v1;
use std::collections::HashMap;
use std::io::{Read, Write};

/// GET http://addr/metrics → the exposition text.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics port");
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    resp.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of the sample `name` (with its labels, exactly as exposed), 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("sample value"))
        .unwrap_or(0.0)
}

fn model_dir(name: &str) -> String {
    fixtures()
        .join("checkpoints")
        .join(name)
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

/// Resident bytes per checkpoint folder (a component shared by two checkpoints counts for both).
fn bytes_by_model(stats: &v1::StatsResponse) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for c in &stats.components {
        for p in &c.paths {
            let model = std::path::Path::new(p)
                .parent()
                .unwrap()
                .display()
                .to_string();
            *m.entry(model).or_default() += c.bytes;
        }
    }
    m
}

/// Leases the components `stats` holds for `model` with a raw Store client, as an orchestrator would.
async fn lease_model(
    store: &mut v1::store_client::StoreClient<tonic::transport::Channel>,
    stats: &v1::StatsResponse,
    model: &str,
) -> String {
    let components = stats
        .components
        .iter()
        .filter_map(|c| {
            let p = c.paths.iter().find(|p| p.starts_with(model))?;
            let name = std::path::Path::new(p)
                .file_name()?
                .to_string_lossy()
                .into_owned();
            let variant = if model.ends_with("sd2-tiny") {
                "fp16"
            } else {
                ""
            };
            let request = v1::ComponentRequest {
                name,
                class_name: c.class_name.clone(),
                path: p.clone(),
                variant: variant.into(),
                upcast_half: false,
            };
            Some((request, c.dtype.clone()))
        })
        .collect::<Vec<_>>();
    let dtype = components.first().map(|c| c.1.clone()).unwrap_or_default();
    let components = components.into_iter().map(|c| c.0).collect();
    let req = v1::AcquireRequest {
        components,
        dtype,
        ..Default::default()
    };
    store.acquire(req).await.unwrap().into_inner().lease_id
}

#[test]
fn budget_smaller_than_two_models_evicts_lru_and_refuses_when_all_is_leased() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sd1, sd2) = (model_dir("sd1-tiny"), model_dir("sd2-tiny"));
    let (r1, r2) = (
        reference_request("sd1_t2i_euler"),
        reference_request("sd2_t2i_dpmpp"),
    );
    // What each model takes once loaded, measured by an unbudgeted store.
    let sizes = {
        let split = Split::start(&[]);
        rt.block_on(async {
            let mut o = orchestrator_client(&split.orchestrator.address).await;
            o.generate(r1.clone()).await.unwrap();
            o.generate(r2.clone()).await.unwrap();
            bytes_by_model(
                &store_client(&split.store.address)
                    .await
                    .stats(v1::StatsRequest {})
                    .await
                    .unwrap()
                    .into_inner(),
            )
        })
    };
    let (s1, s2) = (sizes[&sd1], sizes[&sd2]);
    // Either model fits alone; both do not.
    let budget = s1.max(s2) + s1.min(s2) / 2;
    println!("sd1-tiny {s1} B, sd2-tiny {s2} B, budget {budget} B");

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let split = Split::start(&[
        "--memory-budget",
        &budget.to_string(),
        "--metrics-listen",
        &metrics_addr,
    ]);
    rt.block_on(async {
        let mut o = orchestrator_client(&split.orchestrator.address).await;
        let mut store = store_client(&split.store.address).await;
        let stats_client = store.clone();
        let stats = || {
            let mut s = stats_client.clone();
            async move { s.stats(v1::StatsRequest {}).await.unwrap().into_inner() }
        };
        o.generate(r1.clone()).await.unwrap();
        let st = stats().await;
        assert_eq!((st.evictions, st.resident_bytes, st.active_leases), (0, s1, 0));
        assert_eq!(st.memory_budget_bytes, budget);

        // sd2 needs room: sd1, unleased and least recently used, is evicted (only as much as needed).
        o.generate(r2.clone()).await.unwrap();
        let st = stats().await;
        let by_model = bytes_by_model(&st);
        assert!(st.evictions >= 1, "{st:?}");
        assert_eq!(by_model.get(&sd2).copied(), Some(s2), "sd2 fully resident");
        assert!(by_model.get(&sd1).copied().unwrap_or(0) < s1, "some of sd1 evicted");
        assert!(st.resident_bytes <= budget);
        let evictions_after_sd2 = st.evictions;
        let m = scrape(&metrics_addr);
        assert_eq!(sample(&m, "autopipe_store_evictions_total"), evictions_after_sd2 as f64);
        assert_eq!(sample(&m, "autopipe_store_resident_bytes"), st.resident_bytes as f64);
        assert_eq!(sample(&m, "autopipe_store_memory_budget_bytes"), budget as f64);

        // Everything resident leased by someone else: the orchestrator's request for sd1 cannot fit.
        let held = lease_model(&mut store, &st, &sd2).await;
        let t = std::time::Instant::now();
        let err = o.generate(r1.clone()).await.unwrap_err();
        println!("RESOURCE_EXHAUSTED after {:.1} ms: {}", t.elapsed().as_secs_f64() * 1e3, err.message());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        let st = stats().await;
        assert_eq!(st.active_leases, 1, "only the held lease remains");
        assert_eq!(st.evictions, evictions_after_sd2, "nothing evicted by the refused request");
        assert_eq!(bytes_by_model(&st).get(&sd2).copied(), Some(s2));
        assert!(st.components.iter().all(|c| c.active_leases == 1 || !c.paths.iter().any(|p| p.starts_with(&sd2))));
        let m = scrape(&metrics_addr);
        assert!(sample(&m, "autopipe_store_errors_total{code=\"RESOURCE_EXHAUSTED\"}") >= 1.0, "{m}");
        assert_eq!(sample(&m, "autopipe_store_active_leases"), 1.0);

        // Released, sd2 becomes evictable again and sd1 is served.
        store.release(v1::ReleaseRequest { lease_id: held }).await.unwrap();
        o.generate(r1.clone()).await.unwrap();
        let st = stats().await;
        assert_eq!(bytes_by_model(&st).get(&sd1).copied(), Some(s1));
        assert!(st.evictions > evictions_after_sd2);
        assert_eq!(st.active_leases, 0);
        let m = scrape(&metrics_addr);
        assert_eq!(sample(&m, "autopipe_store_evictions_total"), st.evictions as f64);
        assert_eq!(sample(&m, "autopipe_store_loads_total{class=\"UNet2DConditionModel\",result=\"ok\"}"), 3.0, "{m}");
        assert!(sample(&m, "autopipe_store_load_duration_seconds_count{class=\"UNet2DConditionModel\"}") >= 3.0);
        let unet_forward = "autopipe_store_invoke_duration_seconds_count{class=\"UNet2DConditionModel\",method=\"forward\"}";
        assert!(sample(&m, unet_forward) > 0.0);
        assert!(sample(&m, "autopipe_store_rpcs_total{rpc=\"Acquire\",code=\"OK\"}") >= 4.0);
    });
}

#[test]
fn identical_components_of_two_checkpoints_are_resident_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let split = Split::start(&[]);
    let (sd1, inpaint) = (model_dir("sd1-tiny"), model_dir("sd-inpaint-tiny"));
    rt.block_on(async {
        let mut o = orchestrator_client(&split.orchestrator.address).await;
        o.generate(reference_request("sd1_t2i_euler"))
            .await
            .unwrap();
        o.generate(reference_request("sdinp_inpaint_soft_s075"))
            .await
            .unwrap();
        let st = store_client(&split.store.address)
            .await
            .stats(v1::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        // sd1-tiny and sd-inpaint-tiny ship byte-identical text encoders and VAEs; only the UNets differ.
        assert_eq!(st.components.len(), 4, "{st:?}");
        assert_eq!(st.loads, 4);
        let shared: Vec<_> = st
            .components
            .iter()
            .filter(|c| c.paths.len() == 2)
            .collect();
        assert_eq!(shared.len(), 2, "text_encoder and vae shared");
        for c in &shared {
            assert_eq!(c.load_count, 1);
            assert!(
                c.paths.iter().any(|p| p.starts_with(&sd1))
                    && c.paths.iter().any(|p| p.starts_with(&inpaint))
            );
        }
        assert_eq!(
            st.resident_bytes,
            st.components.iter().map(|c| c.bytes).sum::<u64>()
        );
        let by_model = bytes_by_model(&st);
        let shared_bytes: u64 = shared.iter().map(|c| c.bytes).sum();
        assert_eq!(
            st.resident_bytes,
            by_model[&sd1] + by_model[&inpaint] - shared_bytes
        );
        println!(
            "resident {} B for two checkpoints of {} + {} B",
            st.resident_bytes, by_model[&sd1], by_model[&inpaint]
        );
    });
}
