//! Operator control and lease lifetime of a real `autopipe-store` process over loopback gRPC:
//! `Load`/`Unload` (pin/unpin, stale-on-last-release), lease expiry with `--lease-ttl`, and a suite
//! of bad store RPCs that each get a precise status naming the field while the store stays up.

use autopipe_e2e::*;
use autopipe_proto::transport::Address;
use autopipe_proto::{tensor_to_wire, v1};
use std::time::{Duration, Instant};
use tonic::Code;

type Client = v1::store_client::StoreClient<tonic::transport::Channel>;

fn start_store(extra: &[&str]) -> Service {
    let addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let mut args = vec![
        "--listen".to_string(),
        addr.to_string(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("autopipe-store", addr, &args)
}

/// A component of a fixture checkpoint, as an orchestrator would request it.
fn component(model: &str, name: &str) -> v1::ComponentRequest {
    let class_name = match name {
        "vae" => "AutoencoderKL",
        "unet" => "UNet2DConditionModel",
        _ => "CLIPTextModel",
    };
    let path = fixtures()
        .join("checkpoints")
        .join(model)
        .join(name)
        .canonicalize()
        .unwrap();
    v1::ComponentRequest {
        name: name.into(),
        class_name: class_name.into(),
        path: path.display().to_string(),
        variant: if model == "sd2-tiny" {
            "fp16".into()
        } else {
            String::new()
        },
        upcast_half: false,
    }
}

fn sd1() -> Vec<v1::ComponentRequest> {
    ["text_encoder", "unet", "vae"]
        .map(|n| component("sd1-tiny", n))
        .to_vec()
}

async fn stats(c: &mut Client) -> v1::StatsResponse {
    c.stats(v1::StatsRequest {}).await.unwrap().into_inner()
}

async fn acquire(
    c: &mut Client,
    components: Vec<v1::ComponentRequest>,
) -> Result<v1::AcquireResponse, tonic::Status> {
    c.acquire(v1::AcquireRequest {
        components,
        request_id: "e2e".into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn wire(t: &tch::Tensor) -> Option<v1::Tensor> {
    Some(tensor_to_wire(t).unwrap())
}

fn zeros(shape: &[i64]) -> Option<v1::Tensor> {
    wire(&tch::Tensor::zeros(
        shape,
        (tch::Kind::Float, tch::Device::Cpu),
    ))
}

fn named(name: &str, tensor: Option<v1::Tensor>) -> v1::NamedTensor {
    v1::NamedTensor {
        name: name.into(),
        tensor,
    }
}

fn latents(shape: &[i64]) -> v1::NamedTensor {
    named("latents", zeros(shape))
}

fn decode(lease: &v1::AcquireResponse, inputs: Vec<v1::NamedTensor>) -> v1::InvokeRequest {
    let handle = lease.handles.iter().find(|h| h.name == "vae").unwrap();
    v1::InvokeRequest {
        lease_id: lease.lease_id.clone(),
        handle_id: handle.id.clone(),
        method: "decode".into(),
        inputs,
        request_id: "e2e".into(),
    }
}

#[test]
fn load_pins_and_unload_frees_or_marks_stale() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let u2 = component("sd2-tiny", "unet");
    // Sizes, from an unbudgeted store's Load replies.
    let (s1, su2) = {
        let store = start_store(&[]);
        rt.block_on(async {
            let mut c = store_client(&store.address).await;
            let mut req = v1::LoadRequest {
                components: sd1(),
                ..Default::default()
            };
            req.components.push(v1::ComponentRequest {
                name: "unet2".into(),
                ..u2.clone()
            });
            let r = c.load(req).await.unwrap().into_inner();
            (
                r.components[..3].iter().map(|p| p.bytes).sum::<u64>(),
                r.components[3].bytes,
            )
        })
    };
    // sd1 fits, so does sd2's UNet alone, not both.
    let budget = s1 + su2 / 2;
    let store = start_store(&["--memory-budget", &budget.to_string()]);
    rt.block_on(async {
        let mut c = store_client(&store.address).await;
        let r = c
            .load(v1::LoadRequest {
                components: sd1(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.components
                .iter()
                .all(|p| p.changed && p.active_leases == 0),
            "{r:?}"
        );
        let st = stats(&mut c).await;
        assert_eq!(
            (st.components.len(), st.resident_bytes, st.active_leases),
            (3, s1, 0)
        );
        assert!(st.components.iter().all(|c| c.pinned && !c.stale));

        // Pinned components are never evicted, so sd2's UNet cannot get room.
        let err = acquire(&mut c, vec![u2.clone()]).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let st = stats(&mut c).await;
        assert_eq!(
            (st.components.len(), st.evictions, st.active_leases),
            (3, 0, 0)
        );

        // Unloading an unleased component frees it at once.
        let r = c
            .unload(v1::UnloadRequest {
                components: vec![component("sd1-tiny", "unet")],
                ..Default::default()
            })
            .await;
        let r = r.unwrap().into_inner();
        assert_eq!((r.components.len(), r.components[0].changed), (1, true));
        assert_eq!(stats(&mut c).await.components.len(), 2);
        let lease = acquire(&mut c, vec![u2.clone()]).await.unwrap();

        // Pinning a leased, resident component loads nothing; unloading it marks it stale.
        let r = c
            .load(v1::LoadRequest {
                components: vec![u2.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.components[0].changed, r.components[0].active_leases),
            (false, 1)
        );
        let key = r.components[0].key.clone();
        let r = c
            .unload(v1::UnloadRequest {
                keys: vec![key.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.components[0].changed, r.components[0].active_leases),
            (false, 1)
        );
        let st = stats(&mut c).await;
        let unet = st
            .components
            .iter()
            .find(|c| c.key == key)
            .expect("still resident while leased");
        assert!(unet.stale && !unet.pinned && unet.active_leases == 1);
        // ... and its last release frees it.
        c.release(v1::ReleaseRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap();
        let st = stats(&mut c).await;
        assert!(st.components.iter().all(|c| c.key != key));
        assert_eq!(st.loads, 4);

        let err = c
            .unload(v1::UnloadRequest {
                keys: vec![key],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let keys: Vec<String> = st.components.iter().map(|c| c.key.clone()).collect();
        c.unload(v1::UnloadRequest {
            keys,
            ..Default::default()
        })
        .await
        .unwrap();
        let st = stats(&mut c).await;
        assert_eq!((st.components.len(), st.resident_bytes), (0, 0));
    });
}

#[test]
fn leases_expire_unless_renewed_and_free_their_components() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (v1c, v2c) = (component("sd1-tiny", "vae"), component("sd2-tiny", "vae"));
    // Room for one VAE (float32, about the size of sd1's f32 weight file), not two.
    let file = std::fs::metadata(
        fixtures().join("checkpoints/sd1-tiny/vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap()
    .len();
    let store = start_store(&[
        "--lease-ttl",
        "2",
        "--memory-budget",
        &(file * 3 / 2).to_string(),
    ]);
    rt.block_on(async {
        let mut c = store_client(&store.address).await;
        let lease = acquire(&mut c, vec![v1c.clone()]).await.unwrap();
        assert_eq!(lease.ttl_ms, 2000);
        c.invoke(decode(&lease, vec![latents(&[1, 4, 8, 8])]))
            .await
            .unwrap();
        // Renewed, it outlives its TTL.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            c.renew(v1::RenewRequest {
                lease_id: lease.lease_id.clone(),
            })
            .await
            .unwrap();
        }
        assert_eq!(stats(&mut c).await.active_leases, 1);
        // Not renewed, it expires and the idle reaper ends it.
        let t = Instant::now();
        loop {
            if stats(&mut c).await.active_leases == 0 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(4), "lease did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "lease expired {:.2} s after its last renewal (TTL 2 s)",
            t.elapsed().as_secs_f64()
        );
        let st = stats(&mut c).await;
        assert_eq!((st.expired_leases, st.components[0].active_leases), (1, 0));
        let err = c
            .invoke(decode(&lease, vec![latents(&[1, 4, 8, 8])]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("expired"), "{err:?}");
        let err = c
            .renew(v1::RenewRequest {
                lease_id: lease.lease_id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        // Its component is evictable again: another VAE takes its place.
        let other = acquire(&mut c, vec![v2c]).await.unwrap();
        let st = stats(&mut c).await;
        assert_eq!(
            (st.evictions, st.components.len(), st.active_leases),
            (1, 1, 1)
        );
        assert!(st.components[0].paths[0].contains("sd2-tiny"));
        c.release(v1::ReleaseRequest {
            lease_id: other.lease_id,
        })
        .await
        .unwrap();
    });
}

#[test]
fn bad_store_requests_get_precise_statuses_and_leave_nothing_behind() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = start_store(&[]);
    rt.block_on(async {
        let mut c = store_client(&store.address).await;
        let lease = acquire(&mut c, sd1()).await.unwrap();
        let other = acquire(&mut c, vec![component("sd1-tiny", "vae")])
            .await
            .unwrap();
        let handle = |name: &str| {
            lease
                .handles
                .iter()
                .find(|h| h.name == name)
                .unwrap()
                .id
                .clone()
        };
        let ok_decode = decode(&lease, vec![latents(&[1, 4, 8, 8])]);
        let with = |f: &dyn Fn(&mut v1::InvokeRequest)| {
            let mut r = ok_decode.clone();
            f(&mut r);
            r
        };
        let vae = component("sd1-tiny", "vae");
        let comp = |f: &dyn Fn(&mut v1::ComponentRequest)| {
            let mut r = vae.clone();
            f(&mut r);
            vec![r]
        };
        let acq = |components: Vec<v1::ComponentRequest>, dtype: &str| v1::AcquireRequest {
            components,
            dtype: dtype.into(),
            request_id: "bad".into(),
        };
        let raw = |dtype: i32, shape: Vec<i64>, bytes: usize| {
            named(
                "latents",
                Some(v1::Tensor {
                    dtype,
                    shape,
                    data: vec![0; bytes],
                }),
            )
        };
        let f32 = v1::Dtype::Float32 as i32;
        let unet_call = |inputs: Vec<v1::NamedTensor>| {
            with(&|r| {
                r.handle_id = handle("unet");
                r.method = "forward".into();
                r.inputs = inputs.clone();
            })
        };

        let acquires: Vec<(&str, v1::AcquireRequest, Code, &str)> = vec![
            (
                "no components",
                acq(vec![], ""),
                Code::InvalidArgument,
                "components",
            ),
            (
                "empty name",
                acq(comp(&|c| c.name.clear()), ""),
                Code::InvalidArgument,
                "components[0].name",
            ),
            (
                "empty class",
                acq(comp(&|c| c.class_name.clear()), ""),
                Code::InvalidArgument,
                "components[0].class_name",
            ),
            (
                "empty path",
                acq(comp(&|c| c.path.clear()), ""),
                Code::InvalidArgument,
                "components[0].path",
            ),
            (
                "unknown class",
                acq(
                    comp(&|c| c.class_name = "FluxTransformer2DModel".into()),
                    "",
                ),
                Code::Unimplemented,
                "components[0].class_name",
            ),
            (
                "missing folder",
                acq(comp(&|c| c.path.push_str("/nope")), ""),
                Code::NotFound,
                "components[0].path",
            ),
            (
                "folder without weights",
                acq(comp(&|c| c.path = c.path.replace("/vae", "/tokenizer")), ""),
                Code::NotFound,
                "components[0].path",
            ),
            (
                "duplicate names",
                acq(vec![vae.clone(), vae.clone()], ""),
                Code::InvalidArgument,
                "components[1].name",
            ),
            (
                "unknown dtype",
                acq(vec![vae.clone()], "int8"),
                Code::InvalidArgument,
                "dtype",
            ),
            (
                "weights of another class",
                acq(comp(&|c| c.class_name = "UNet2DConditionModel".into()), ""),
                Code::FailedPrecondition,
                "components[0]",
            ),
        ];
        let invokes: Vec<(&str, v1::InvokeRequest, Code, &str)> = vec![
            (
                "unknown lease",
                with(&|r| r.lease_id = "nope".into()),
                Code::FailedPrecondition,
                "lease_id",
            ),
            (
                "empty lease",
                with(&|r| r.lease_id.clear()),
                Code::FailedPrecondition,
                "lease_id",
            ),
            (
                "handle of another lease",
                with(&|r| r.handle_id = other.handles[0].id.clone()),
                Code::InvalidArgument,
                "handle_id",
            ),
            (
                "empty handle",
                with(&|r| r.handle_id.clear()),
                Code::InvalidArgument,
                "handle_id",
            ),
            (
                "unknown method",
                with(&|r| r.method = "forward".into()),
                Code::InvalidArgument,
                "method",
            ),
            (
                "empty method",
                with(&|r| r.method.clear()),
                Code::InvalidArgument,
                "method",
            ),
            (
                "bytes ≠ dtype×shape",
                with(&|r| r.inputs = vec![raw(f32, vec![1, 4, 8, 8], 1023)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "unknown wire dtype",
                with(&|r| r.inputs = vec![raw(99, vec![1, 4, 8, 8], 1024)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "unspecified wire dtype",
                with(&|r| r.inputs = vec![raw(0, vec![1, 4, 8, 8], 1024)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "negative dimension",
                with(&|r| r.inputs = vec![raw(f32, vec![1, -4, 8, 8], 0)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "overflowing shape",
                with(&|r| r.inputs = vec![raw(f32, vec![1 << 40, 1 << 40], 0)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "input without tensor",
                with(&|r| r.inputs = vec![named("latents", None)]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "unnamed input",
                with(&|r| r.inputs[0].name.clear()),
                Code::InvalidArgument,
                "inputs[0].name",
            ),
            (
                "unexpected input",
                with(&|r| r.inputs[0].name = "z".into()),
                Code::InvalidArgument,
                "inputs.z",
            ),
            (
                "missing input",
                with(&|r| r.inputs.clear()),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "wrong rank",
                with(&|r| r.inputs = vec![latents(&[4, 8, 8])]),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "duplicate input",
                with(&|r| r.inputs.push(latents(&[1, 4, 8, 8]))),
                Code::InvalidArgument,
                "inputs.latents",
            ),
            (
                "wrong channel count",
                with(&|r| r.inputs = vec![latents(&[1, 3, 8, 8])]),
                Code::InvalidArgument,
                "inputs",
            ),
            (
                "float token ids",
                with(&|r| {
                    r.handle_id = handle("text_encoder");
                    r.method = "encode".into();
                    r.inputs = vec![named("input_ids", zeros(&[1, 77]))];
                }),
                Code::InvalidArgument,
                "inputs.input_ids",
            ),
            (
                "timestep of rank 2",
                unet_call(vec![
                    named("sample", zeros(&[1, 4, 8, 8])),
                    named("timestep", zeros(&[1, 1])),
                    named("encoder_hidden_states", zeros(&[1, 77, 32])),
                ]),
                Code::InvalidArgument,
                "inputs.timestep",
            ),
            (
                "text_embeds without time_ids",
                unet_call(vec![
                    named("sample", zeros(&[1, 4, 8, 8])),
                    named("timestep", zeros(&[1])),
                    named("encoder_hidden_states", zeros(&[1, 77, 32])),
                    named("text_embeds", zeros(&[1, 32])),
                ]),
                Code::InvalidArgument,
                "inputs.time_ids",
            ),
        ];
        let mut checked = 0;
        let mut expect = |what: &str, r: Result<(), tonic::Status>, code: Code, field: &str| {
            let err = r.expect_err(what);
            assert_eq!(err.code(), code, "{what}: {err:?}");
            assert!(
                err.message().starts_with(field),
                "{what}: expected the field {field:?} first: {:?}",
                err.message()
            );
            checked += 1;
        };
        for (what, req, code, field) in acquires {
            expect(what, c.acquire(req).await.map(|_| ()), code, field);
        }
        for (what, req, code, field) in invokes {
            expect(what, c.invoke(req).await.map(|_| ()), code, field);
        }
        let r = c
            .renew(v1::RenewRequest {
                lease_id: "nope".into(),
            })
            .await;
        expect(
            "renew unknown",
            r.map(|_| ()),
            Code::FailedPrecondition,
            "lease_id",
        );
        let r = c
            .renew(v1::RenewRequest {
                lease_id: String::new(),
            })
            .await;
        expect(
            "renew empty",
            r.map(|_| ()),
            Code::FailedPrecondition,
            "lease_id",
        );
        let r = c
            .release(v1::ReleaseRequest {
                lease_id: "nope".into(),
            })
            .await;
        expect(
            "release unknown",
            r.map(|_| ()),
            Code::FailedPrecondition,
            "lease_id",
        );
        expect(
            "load nothing",
            c.load(v1::LoadRequest::default()).await.map(|_| ()),
            Code::InvalidArgument,
            "components",
        );
        let bad_dtype = v1::LoadRequest {
            components: vec![vae.clone()],
            dtype: "fp8".into(),
            ..Default::default()
        };
        expect(
            "load unknown dtype",
            c.load(bad_dtype).await.map(|_| ()),
            Code::InvalidArgument,
            "dtype",
        );
        expect(
            "unload nothing",
            c.unload(v1::UnloadRequest::default()).await.map(|_| ()),
            Code::InvalidArgument,
            "components",
        );
        let unknown_key = v1::UnloadRequest {
            keys: vec!["0123:float32:cpu".into()],
            ..Default::default()
        };
        expect(
            "unload unknown key",
            c.unload(unknown_key).await.map(|_| ()),
            Code::NotFound,
            "keys[0]",
        );
        println!("{checked} bad store requests, each with its status and field");
        assert!(checked >= 35);

        // Still serving: the good call works, only our two leases exist, and no failed load left a trace.
        let out = c.invoke(ok_decode.clone()).await.unwrap().into_inner();
        assert_eq!(
            out.outputs[0].tensor.as_ref().unwrap().shape,
            vec![1, 3, 16, 16]
        );
        let st = stats(&mut c).await;
        assert_eq!((st.active_leases, st.components.len(), st.loads), (2, 3, 3));
        c.release(v1::ReleaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap();
        c.release(v1::ReleaseRequest {
            lease_id: other.lease_id.clone(),
        })
        .await
        .unwrap();
        assert_eq!(stats(&mut c).await.active_leases, 0);
    });
}
