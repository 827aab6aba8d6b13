//! Engine tests on the tiny diffusers checkpoints in tests/fixtures: budget, LRU eviction, fail-fast
//! admission, coalesced loads, content dedup, pins, lease expiry and input validation.

use super::*;
use crate::TempDir;
use std::path::Path;
use std::sync::{mpsc, Barrier};
use tch::Tensor;

fn fixture(model: &str, name: &str) -> ComponentSpec {
    let class_name = match name {
        "vae" => "AutoencoderKL",
        "unet" => "UNet2DConditionModel",
        _ => "CLIPTextModel",
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/checkpoints")
        .join(model)
        .join(name);
    ComponentSpec {
        name: name.into(),
        class_name: class_name.into(),
        path: path.canonicalize().expect("fixture component"),
        variant: (model == "sd2-tiny").then(|| "fp16".to_string()),
        upcast_half: false,
    }
}

/// Bytes a component takes once loaded in float32.
fn size(spec: &ComponentSpec) -> u64 {
    let files =
        autopipe_models::weights::weight_files(&spec.path, spec.variant.as_deref()).unwrap();
    estimate_bytes(&files, Kind::Float).unwrap()
}

fn store(budget: Option<u64>) -> Store {
    Store::new(StoreConfig {
        memory_budget: budget,
        ..Default::default()
    })
}

fn acquire(store: &Store, specs: &[ComponentSpec]) -> Result<Lease, StoreError> {
    store.acquire(&AcquireRequest {
        components: specs.to_vec(),
        kind: None,
        request_id: "test".into(),
    })
}

/// (first path, leases, pinned) of each resident component, by path.
fn resident(store: &Store) -> Vec<(String, u32, bool)> {
    let mut v: Vec<_> = store
        .stats()
        .components
        .into_iter()
        .map(|c| (c.paths[0].clone(), c.active_leases, c.pinned))
        .collect();
    v.sort();
    v
}

fn path(spec: &ComponentSpec) -> String {
    spec.path.display().to_string()
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// Entries in the state map, resident or not: a failed load must leave no placeholder.
fn entry_count(store: &Store) -> usize {
    store.state().entries.len()
}

#[test]
fn evicts_the_least_recently_used_unleased_component() {
    let (a, b, c) = (
        fixture("sd1-tiny", "vae"),
        fixture("sd2-tiny", "vae"),
        fixture("sd-inpaint-tiny", "unet"),
    );
    let (sa, sb, sc) = (size(&a), size(&b), size(&c));
    // Room for any two, not all three.
    let s = store(Some(sa + sb + sc - 1));
    for spec in [&a, &b, &a] {
        let lease = acquire(&s, std::slice::from_ref(spec)).unwrap();
        s.release(&lease.id).unwrap();
    }
    assert_eq!(s.stats().resident_bytes, sa + sb);
    // b was used less recently than a (a was acquired again), so b goes.
    let lease = acquire(&s, std::slice::from_ref(&c)).unwrap();
    let stats = s.stats();
    assert_eq!(stats.evictions, 1);
    assert_eq!(stats.resident_bytes, sa + sc);
    assert_eq!(
        resident(&s),
        sorted(vec![(path(&a), 0, false), (path(&c), 1, false)])
    );
    // a was found resident the second time, never reloaded.
    assert_eq!(stats.loads, 3);
    assert!(stats.components.iter().all(|c| c.load_count == 1));
    s.release(&lease.id).unwrap();
}

#[test]
fn a_load_that_cannot_fit_beside_leased_components_fails_fast_and_leaves_nothing() {
    let (a, b, c) = (
        fixture("sd1-tiny", "vae"),
        fixture("sd2-tiny", "vae"),
        fixture("sd-inpaint-tiny", "unet"),
    );
    let (sa, sb, sc) = (size(&a), size(&b), size(&c));
    let s = store(Some(sa + sc - 1));
    let held = acquire(&s, std::slice::from_ref(&a)).unwrap();
    let err = acquire(&s, std::slice::from_ref(&c)).unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted, "{err}");
    // Two components, the first of which would fit alone: refused before loading either.
    let s2 = store(Some(sa + sb + sc - 1));
    let held2 = acquire(&s2, std::slice::from_ref(&a)).unwrap();
    let err = acquire(&s2, &[b.clone(), c.clone()]).unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted, "{err}");
    for (store, lease) in [(&s, &held), (&s2, &held2)] {
        let stats = store.stats();
        assert_eq!(
            (stats.loads, stats.evictions, stats.active_leases),
            (1, 0, 1)
        );
        assert_eq!(resident(store), vec![(path(&a), 1, false)]);
        assert_eq!(entry_count(store), 1, "no placeholder left behind");
        store.release(&lease.id).unwrap();
    }
    // Once released, the same request succeeds by evicting it.
    let lease = acquire(&s, std::slice::from_ref(&c)).unwrap();
    assert_eq!(s.stats().evictions, 1);
    assert_eq!(resident(&s), vec![(path(&c), 1, false)]);
    s.release(&lease.id).unwrap();
}

#[test]
fn a_component_larger_than_the_whole_budget_is_refused_without_evicting() {
    let (a, c) = (
        fixture("sd1-tiny", "vae"),
        fixture("sd-inpaint-tiny", "unet"),
    );
    let (sa, sc) = (size(&a), size(&c));
    assert!(sa < sc);
    let s = store(Some(sc - 1));
    let lease = acquire(&s, std::slice::from_ref(&a)).unwrap();
    s.release(&lease.id).unwrap();
    let err = acquire(&s, std::slice::from_ref(&c)).unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    assert!(err.message.contains("whole budget"), "{err}");
    let stats = s.stats();
    assert_eq!(
        (stats.evictions, stats.resident_bytes, stats.active_leases),
        (0, sa, 0)
    );
    let err = s.load(std::slice::from_ref(&c), None).unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    assert_eq!(entry_count(&s), 1);
}

#[test]
fn concurrent_acquisitions_of_one_component_coalesce_into_one_load() {
    let unet = fixture("sd1-tiny", "unet");
    let s = store(None);
    let n = 8;
    let barrier = Barrier::new(n);
    let leases: Vec<Lease> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    acquire(&s, std::slice::from_ref(&unet)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stats = s.stats();
    assert_eq!(stats.loads, 1);
    assert_eq!(stats.components.len(), 1);
    assert_eq!(
        (
            stats.components[0].load_count,
            stats.components[0].active_leases
        ),
        (1, n as u32)
    );
    assert_eq!(stats.active_leases, n as u32);
    let ids: HashSet<&str> = leases.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids.len(), n);
    for l in &leases {
        s.release(&l.id).unwrap();
    }
    assert_eq!(s.stats().components[0].active_leases, 0);
}

#[test]
fn identical_content_in_two_checkpoints_is_stored_once() {
    let (v1, v2) = (
        fixture("sd1-tiny", "vae"),
        fixture("sd-inpaint-tiny", "vae"),
    );
    let (u1, u2) = (
        fixture("sd1-tiny", "unet"),
        fixture("sd-inpaint-tiny", "unet"),
    );
    let s = store(None);
    let l1 = acquire(&s, &[v1.clone(), u1.clone()]).unwrap();
    let l2 = acquire(&s, &[v2.clone(), u2.clone()]).unwrap();
    let stats = s.stats();
    // Same VAE bytes in both checkpoints: one resident copy, leased twice; the UNets differ.
    assert_eq!(stats.components.len(), 3);
    assert_eq!(stats.loads, 3);
    assert_eq!(stats.resident_bytes, size(&v1) + size(&u1) + size(&u2));
    let vae = stats
        .components
        .iter()
        .find(|c| c.class_name == "AutoencoderKL")
        .unwrap();
    assert_eq!((vae.load_count, vae.active_leases), (1, 2));
    assert_eq!(vae.paths, sorted(vec![path(&v1), path(&v2)]));
    s.release(&l1.id).unwrap();
    s.release(&l2.id).unwrap();
}

/// A copy of `spec`'s folder in a fresh temp dir (other files, same bytes), with `patch` applied
/// to its weights; removed with the returned guard.
fn copy_of(spec: &ComponentSpec, patch: impl FnOnce(&mut Vec<u8>)) -> (TempDir, ComponentSpec) {
    let dir = TempDir::new();
    std::fs::copy(
        spec.path.join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let files =
        autopipe_models::weights::weight_files(&spec.path, spec.variant.as_deref()).unwrap();
    let (first, rest) = files.split_first().unwrap();
    let mut bytes = std::fs::read(first).unwrap();
    patch(&mut bytes);
    std::fs::write(dir.path().join(first.file_name().unwrap()), bytes).unwrap();
    for f in rest {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let copy = ComponentSpec {
        path: dir.path().to_path_buf(),
        ..spec.clone()
    };
    (dir, copy)
}

#[test]
fn bytes_are_hashed_only_to_tell_apart_components_that_could_be_the_same() {
    let s = store(None);
    let (vae, unet) = (fixture("sd1-tiny", "vae"), fixture("sd1-tiny", "unet"));
    let l1 = acquire(&s, &[vae.clone(), unet.clone()]).unwrap();
    // Nothing resident could be the same: keyed by the files alone.
    assert_eq!(s.digests.files_hashed(), 0);
    // sd-inpaint-tiny's VAE has the fingerprint (class, config, file sizes) of sd1-tiny's: both are
    // hashed and found the same. Its UNet (9 input channels) cannot be the same: not hashed.
    let twins = [
        fixture("sd-inpaint-tiny", "vae"),
        fixture("sd-inpaint-tiny", "unet"),
    ];
    let l2 = acquire(&s, &twins).unwrap();
    assert_eq!(s.digests.files_hashed(), 2);
    assert_eq!(s.stats().loads, 3);
    let l3 = acquire(&s, &twins).unwrap();
    assert_eq!(s.digests.files_hashed(), 2, "hashed once per file version");
    // Same sizes and config, one weight byte different: another component.
    let (_dir, changed) = copy_of(&vae, |b| {
        let last = b.len() - 1;
        b[last] ^= 0x40;
    });
    let l4 = acquire(&s, std::slice::from_ref(&changed)).unwrap();
    assert_eq!(s.stats().loads, 4);
    assert_eq!(s.digests.files_hashed(), 3);
    for l in [l1, l2, l3, l4] {
        s.release(&l.id).unwrap();
    }
}

#[test]
fn concurrent_requests_for_two_copies_of_a_component_share_one_load() {
    for round in 0..4 {
        let s = store(None);
        let vae = fixture("sd1-tiny", "vae");
        let (_dir, copy) = copy_of(&vae, |_| {});
        let barrier = Barrier::new(2);
        let leases: Vec<Lease> = std::thread::scope(|scope| {
            let run = |spec: &ComponentSpec| {
                barrier.wait();
                acquire(&s, std::slice::from_ref(spec)).unwrap()
            };
            let (vae, copy) = (&vae, &copy);
            let a = scope.spawn(move || run(vae));
            let b = scope.spawn(move || run(copy));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        // Whichever resolved first, the other found it (before or after taking the state lock).
        let stats = s.stats();
        assert_eq!(
            (stats.loads, stats.components.len()),
            (1, 1),
            "round {round}"
        );
        assert_eq!(stats.components[0].active_leases, 2);
        for l in leases {
            s.release(&l.id).unwrap();
        }
    }
}

#[test]
fn pinned_components_are_never_evicted_and_unload_frees_them() {
    let (a, b, c) = (
        fixture("sd1-tiny", "vae"),
        fixture("sd2-tiny", "vae"),
        fixture("sd-inpaint-tiny", "unet"),
    );
    let (sa, sb, sc) = (size(&a), size(&b), size(&c));
    let s = store(Some(sa + sb + sc - 1));
    let pinned = s.load(std::slice::from_ref(&a), None).unwrap();
    assert_eq!(pinned.len(), 1);
    assert!(pinned[0].changed && pinned[0].bytes == sa);
    let lease = acquire(&s, std::slice::from_ref(&b)).unwrap();
    s.release(&lease.id).unwrap();
    // a is the least recently used, but pinned: b is evicted instead.
    let lease = acquire(&s, std::slice::from_ref(&c)).unwrap();
    assert_eq!(s.stats().evictions, 1);
    assert_eq!(
        resident(&s),
        sorted(vec![(path(&a), 0, true), (path(&c), 1, false)])
    );
    // Pinned a and leased c leave no room for b.
    assert_eq!(
        acquire(&s, std::slice::from_ref(&b)).unwrap_err().code,
        Code::ResourceExhausted
    );
    // Unloading an unleased component frees it now.
    let out = s.unload(std::slice::from_ref(&a), None, &[]).unwrap();
    assert!(out[0].changed);
    assert_eq!(resident(&s), vec![(path(&c), 1, false)]);
    // Unloading a leased one marks it stale; its last release frees it.
    let again = s.load(std::slice::from_ref(&c), None).unwrap();
    assert!(!again[0].changed, "already resident");
    assert_eq!(again[0].active_leases, 1);
    let key = again[0].key.clone();
    let out = s.unload(&[], None, std::slice::from_ref(&key)).unwrap();
    assert_eq!((out[0].changed, out[0].active_leases), (false, 1));
    let stats = s.stats();
    assert!(stats.components[0].stale && !stats.components[0].pinned);
    s.release(&lease.id).unwrap();
    assert!(s.stats().components.is_empty());
    assert_eq!(entry_count(&s), 0);
    let err = s.unload(&[], None, &[key]).unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    assert_eq!(
        s.unload(std::slice::from_ref(&a), None, &[])
            .unwrap_err()
            .code,
        Code::NotFound
    );
    assert_eq!(
        s.unload(&[], None, &[]).unwrap_err().code,
        Code::InvalidArgument
    );
}

#[test]
fn an_expired_lease_fails_precondition_and_its_components_become_evictable() {
    let (a, b) = (fixture("sd1-tiny", "vae"), fixture("sd2-tiny", "vae"));
    let s = Store::new(StoreConfig {
        memory_budget: Some(size(&a) + size(&b) - 1),
        lease_ttl: Duration::from_millis(300),
        ..Default::default()
    });
    let lease = acquire(&s, std::slice::from_ref(&a)).unwrap();
    let handle = lease.handle("vae").unwrap().id.clone();
    std::thread::sleep(Duration::from_millis(500));
    let latents = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let err = s
        .invoke(
            &lease.id,
            &handle,
            "decode",
            vec![("latents".into(), latents)],
            "r",
        )
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(err.message.contains("expired"), "{err}");
    assert_eq!(
        s.renew(&lease.id).unwrap_err().code,
        Code::FailedPrecondition
    );
    let stats = s.stats();
    assert_eq!(
        (
            stats.active_leases,
            stats.expired_leases,
            stats.components[0].active_leases
        ),
        (0, 1, 0)
    );
    // The expired lease no longer protects a: b's load evicts it.
    let lease = acquire(&s, std::slice::from_ref(&b)).unwrap();
    assert_eq!(s.stats().evictions, 1);
    assert_eq!(resident(&s), vec![(path(&b), 1, false)]);
    // Renewed in time, a lease outlives its TTL.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        s.renew(&lease.id).unwrap();
    }
    assert_eq!(s.stats().active_leases, 1);
}

#[test]
fn a_failed_load_leaves_no_placeholder_and_no_lease() {
    let good = fixture("sd1-tiny", "vae");
    // VAE weights named as a UNet: the load fails after the lease was taken.
    let bad = ComponentSpec {
        name: "unet".into(),
        class_name: "UNet2DConditionModel".into(),
        ..good.clone()
    };
    let s = store(Some(1 << 30));
    let err = acquire(&s, &[good.clone(), bad]).unwrap_err();
    assert_ne!(err.code, Code::Internal, "{err}");
    assert!(err.message.starts_with("components[1]: \"unet\""), "{err}");
    let stats = s.stats();
    assert_eq!(stats.active_leases, 0);
    // The good component stays cached (unleased, evictable); the failed one left nothing.
    assert_eq!(resident(&s), vec![(path(&good), 0, false)]);
    assert_eq!(entry_count(&s), 1);
    assert_eq!(s.state().charged_bytes(), size(&good));
}

#[test]
fn store_calls_are_validated_with_the_field_named() {
    let vae = fixture("sd1-tiny", "vae");
    let s = store(None);
    let check = |r: Result<Lease, StoreError>, code: Code, field: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code, code, "{err}");
        assert!(err.message.starts_with(field), "{field}: {err}");
    };
    check(acquire(&s, &[]), Code::InvalidArgument, "components");
    check(
        acquire(&s, &[vae.clone(), vae.clone()]),
        Code::InvalidArgument,
        "components[1].name",
    );
    let unknown = ComponentSpec {
        class_name: "FluxTransformer2DModel".into(),
        ..vae.clone()
    };
    check(
        acquire(&s, &[unknown]),
        Code::Unimplemented,
        "components[0].class_name",
    );
    let missing = ComponentSpec {
        path: vae.path.join("nope"),
        ..vae.clone()
    };
    check(
        acquire(&s, &[missing]),
        Code::NotFound,
        "components[0].path",
    );
    let empty = ComponentSpec {
        path: vae.path.parent().unwrap().join("tokenizer"),
        ..vae.clone()
    };
    check(acquire(&s, &[empty]), Code::NotFound, "components[0].path");
    assert_eq!(entry_count(&s), 0);

    let lease = acquire(&s, std::slice::from_ref(&vae)).unwrap();
    let other = acquire(&s, std::slice::from_ref(&vae)).unwrap();
    let h = lease.handle("vae").unwrap().id.clone();
    let latents = || Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let zeros = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let invoke = |lease: &str, handle: &str, method: &str, inputs: Tensors| {
        s.invoke(lease, handle, method, inputs, "r")
    };
    let other_handle = other.handle("vae").unwrap().id.clone();
    let cases: Vec<(Result<Tensors, StoreError>, Code, &str)> = vec![
        (
            invoke("nope", &h, "decode", vec![("latents".into(), latents())]),
            Code::FailedPrecondition,
            "lease_id",
        ),
        (
            invoke("", &h, "decode", vec![("latents".into(), latents())]),
            Code::FailedPrecondition,
            "lease_id",
        ),
        (
            invoke(&lease.id, "", "decode", vec![]),
            Code::InvalidArgument,
            "handle_id",
        ),
        (
            invoke(
                &lease.id,
                &other_handle,
                "decode",
                vec![("latents".into(), latents())],
            ),
            Code::InvalidArgument,
            "handle_id",
        ),
        (
            invoke(
                &lease.id,
                &h,
                "forward",
                vec![("latents".into(), latents())],
            ),
            Code::InvalidArgument,
            "method",
        ),
        (
            invoke(&lease.id, &h, "decode", vec![("z".into(), latents())]),
            Code::InvalidArgument,
            "inputs.z",
        ),
        (
            invoke(&lease.id, &h, "decode", vec![]),
            Code::InvalidArgument,
            "inputs.latents",
        ),
        (
            invoke(
                &lease.id,
                &h,
                "decode",
                vec![("latents".into(), zeros(&[4, 8, 8]))],
            ),
            Code::InvalidArgument,
            "inputs.latents",
        ),
        (
            invoke(
                &lease.id,
                &h,
                "decode",
                vec![("latents".into(), latents()), ("latents".into(), latents())],
            ),
            Code::InvalidArgument,
            "inputs.latents",
        ),
        (
            invoke(
                &lease.id,
                &h,
                "decode",
                vec![("latents".into(), zeros(&[1, 3, 8, 8]))],
            ),
            Code::InvalidArgument,
            "inputs",
        ),
    ];
    for (i, (r, code, field)) in cases.into_iter().enumerate() {
        let err = r.unwrap_err();
        assert_eq!(err.code, code, "case {i}: {err}");
        assert!(err.message.starts_with(field), "case {i}: {field}: {err}");
    }
    let out = invoke(&lease.id, &h, "decode", vec![("latents".into(), latents())]).unwrap();
    assert_eq!(out[0].1.size(), vec![1, 3, 16, 16]);
    assert_eq!(
        s.release("nope").unwrap_err().code,
        Code::FailedPrecondition
    );
    s.release(&lease.id).unwrap();
    assert_eq!(
        s.release(&lease.id).unwrap_err().code,
        Code::FailedPrecondition
    );
    s.release(&other.id).unwrap();
    assert_eq!(s.stats().active_leases, 0);
}

#[test]
fn a_kind_that_is_not_a_component_dtype_is_refused() {
    let s = store(None);
    let err = s
        .acquire(&AcquireRequest {
            components: vec![fixture("sd1-tiny", "vae")],
            kind: Some(Kind::Int64),
            request_id: "test".into(),
        })
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.starts_with("dtype:"), "{err}");
    assert!(s.stats().components.is_empty());
}

#[test]
fn an_upcast_component_is_held_in_float32_when_float16_is_asked() {
    let s = store(None);
    let upcast = ComponentSpec {
        upcast_half: true,
        ..fixture("sd1-tiny", "vae")
    };
    let acquire_as = |spec: &ComponentSpec, kind| {
        let lease = s
            .acquire(&AcquireRequest {
                components: vec![spec.clone()],
                kind: Some(kind),
                request_id: "test".into(),
            })
            .unwrap();
        s.release(&lease.id).unwrap();
    };
    acquire_as(&upcast, Kind::Half);
    acquire_as(&upcast, Kind::BFloat16);
    acquire_as(&fixture("sd1-tiny", "vae"), Kind::Half);
    let mut dtypes: Vec<String> = s.stats().components.into_iter().map(|c| c.dtype).collect();
    dtypes.sort();
    // float16 asked with upcast → float32; bfloat16 is not upcast; without upcast → float16.
    assert_eq!(dtypes, ["bfloat16", "float16", "float32"]);
}

#[test]
fn component_calls_go_on_while_another_component_loads() {
    let s = store(None);
    let lease = acquire(&s, &[fixture("sd1-tiny", "vae")]).unwrap();
    let handle = lease.handle("vae").unwrap().id.clone();
    // Hold the loader thread until released: a load queued now cannot finish before that.
    let (release, held) = mpsc::channel::<()>();
    let (busy, is_busy) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let blocker = scope.spawn(|| {
            s.loader.run(move || {
                let _ = busy.send(());
                let _ = held.recv();
            })
        });
        is_busy.recv().unwrap();
        let loading = scope.spawn(|| acquire(&s, &[fixture("sd1-tiny", "unet")]));
        // A decode on the resident VAE completes while that load waits for the loader.
        let latents = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let out = s
            .invoke(
                &lease.id,
                &handle,
                "decode",
                vec![("latents".into(), latents)],
                "r",
            )
            .expect("decode while a load is queued");
        assert_eq!(out[0].1.size()[1], 3);
        assert!(
            !loading.is_finished(),
            "the UNet's load finished while the loader thread was held"
        );
        release.send(()).unwrap();
        blocker.join().unwrap().unwrap();
        loading.join().unwrap().expect("the load after the release");
    });
}

/// Deterministic, distinct inputs without touching libtorch's global generator.
fn pattern(shape: &[i64], seed: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.731 + seed * 1.37)
        .sin()
        .view(shape)
}

/// One request's UNet call at some step: a CFG pair (2 rows), its own latents, prompt and timestep.
fn unet_call(i: usize, size: i64) -> Tensors {
    vec![
        ("sample".into(), pattern(&[2, 4, size, size], i as f64)),
        ("timestep".into(), Tensor::from(981.0f32 - 97.0 * i as f32)),
        (
            "encoder_hidden_states".into(),
            pattern(&[2, 7, 32], 10.0 + i as f64),
        ),
    ]
}

/// Runs `calls` (method `method` on the component leased as `name`, one lease per call, as
/// concurrent requests hold them) one at a time, then all queued behind a held compute thread so
/// that the first job finds them all waiting (no timing involved); returns each call's outputs
/// alone and then joined, and checks that `joined` calls ran as one forward.
fn alone_then_queued(
    s: &Store,
    spec: &ComponentSpec,
    method: &str,
    calls: &[Tensors],
    joined: usize,
) -> (Vec<Tensors>, Vec<Tensors>) {
    let copy = |t: &Tensors| -> Tensors { t.iter().map(|(n, t)| (n.clone(), t.copy())).collect() };
    let leases: Vec<Lease> = calls
        .iter()
        .map(|_| acquire(s, std::slice::from_ref(spec)).unwrap())
        .collect();
    let invoke = |i: usize, inputs: Tensors| {
        let lease = &leases[i];
        let handle = &lease.handle(&spec.name).unwrap().id;
        s.invoke(&lease.id, handle, method, inputs, "r")
    };
    let before = s.stats().batching;
    let alone: Vec<Tensors> = (0..calls.len())
        .map(|i| invoke(i, copy(&calls[i])).unwrap())
        .collect();
    assert_eq!(s.stats().batching, before, "one at a time");

    let (release, held) = mpsc::channel::<()>();
    let (busy, is_busy) = mpsc::channel::<()>();
    let queued: Vec<Tensors> = std::thread::scope(|scope| {
        let blocker = scope.spawn(|| {
            s.compute.run(move || {
                let _ = busy.send(());
                let _ = held.recv();
            })
        });
        is_busy.recv().unwrap();
        let callers: Vec<_> = (0..calls.len())
            .map(|i| {
                let inputs = copy(&calls[i]);
                scope.spawn(move || invoke(i, inputs))
            })
            .collect();
        let waiting = Instant::now();
        while s.batcher.queued() < calls.len() {
            assert!(
                waiting.elapsed() < Duration::from_secs(60),
                "calls not queued"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        release.send(()).unwrap();
        blocker.join().unwrap().unwrap();
        callers
            .into_iter()
            .map(|c| c.join().unwrap().unwrap())
            .collect()
    });
    assert_eq!(
        s.stats().batching,
        BatchStats {
            batched_forwards: before.batched_forwards + 1,
            batched_calls: before.batched_calls + joined as u64
        }
    );
    for lease in &leases {
        s.release(&lease.id).unwrap();
    }
    (alone, queued)
}

/// Every output of every call equals the call's output alone (to float rounding: a joined forward
/// may take other kernels' paths), and the rows went back to their own callers.
fn assert_same_outputs(what: &str, alone: &[Tensors], joined: &[Tensors]) {
    for (i, (a, b)) in alone.iter().zip(joined).enumerate() {
        assert_eq!(a.len(), b.len(), "{what} call {i}: outputs");
        for ((name, a), (name_b, b)) in a.iter().zip(b) {
            assert_eq!((name, a.size()), (name_b, b.size()), "{what} call {i}");
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            let diff = f64::try_from((&a - &b).abs().max()).unwrap();
            let scale = f64::try_from(a.abs().max()).unwrap();
            println!(
                "{what} call {i} {name}: max |joined - alone| = {diff:.2e} (outputs up to {scale:.2})"
            );
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{what} call {i} {name}: {diff}"
            );
        }
    }
    // Different inputs, different outputs: nothing came back shuffled.
    let first = |c: &Tensors| c[0].1.to_kind(Kind::Float);
    assert!(f64::try_from((first(&joined[0]) - first(&joined[1])).abs().max()).unwrap() > 1e-3);
}

#[test]
fn queued_unet_calls_run_as_one_forward_with_the_outputs_they_get_alone() {
    const CALLS: usize = 4;
    let s = Store::new(StoreConfig {
        max_batch: CALLS,
        batch_window: Duration::ZERO,
        ..Default::default()
    });
    // The last call has another latent size, so another signature: it runs in a forward of its own.
    let calls: Vec<Tensors> = (0..=CALLS)
        .map(|i| unet_call(i, if i < CALLS { 8 } else { 16 }))
        .collect();
    let (alone, joined) =
        alone_then_queued(&s, &fixture("sd1-tiny", "unet"), "forward", &calls, CALLS);
    assert_same_outputs("unet", &alone, &joined);
    assert_eq!(s.stats().active_leases, 0);
}

#[test]
fn queued_text_encoder_calls_join_with_the_outputs_they_get_alone() {
    let s = Store::new(StoreConfig {
        max_batch: 8,
        batch_window: Duration::ZERO,
        ..Default::default()
    });
    // Prompts as token ids: a CFG pair (negative, prompt) or one prompt, each ending in its own
    // end-of-text position, which pooling picks per row.
    let ids = |rows: i64, seed: i64| {
        let ids = ((Tensor::arange(rows * 77, (Kind::Int64, Device::Cpu)) * 7 + seed * 131)
            .remainder(400)
            + 1)
        .view([rows, 77]);
        for r in 0..rows {
            let _ = ids.get(r).narrow(0, 5 + 3 * seed + r, 1).fill_(49407);
        }
        vec![("input_ids".to_string(), ids)]
    };
    let prompts: Vec<Tensors> = vec![ids(2, 0), ids(1, 1), ids(2, 2)];
    let (alone, joined) = alone_then_queued(
        &s,
        &fixture("sd1-tiny", "text_encoder"),
        "encode",
        &prompts,
        3,
    );
    assert_same_outputs("text_encoder.encode", &alone, &joined);

    assert_eq!(s.stats().active_leases, 0);
}

/// A UNet call that waits for partners does not wait for a request that has moved on: one that
/// called the UNet with another signature (another size) or whose latest call went elsewhere after
/// its loop (its VAE decode). The window is far longer than the test, so a wait fails it.
#[test]
fn a_call_does_not_wait_for_requests_that_left_its_loop() {
    let s = Arc::new(Store::new(StoreConfig {
        max_batch: 4,
        batch_window: Duration::from_secs(3600),
        ..Default::default()
    }));
    let specs = [fixture("sd1-tiny", "unet"), fixture("sd1-tiny", "vae")];
    // A call that must not wait out the window.
    let call = |lease: &Lease, name: &str, method: &str, inputs: Tensors| {
        let (store, id) = (s.clone(), lease.id.clone());
        let handle = lease.handle(name).unwrap().id.clone();
        let method = method.to_string();
        let (done, answered) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(store.invoke(&id, &handle, &method, inputs, "r"));
        });
        answered
            .recv_timeout(Duration::from_secs(300))
            .expect("the call waited for requests that will not make it")
            .unwrap()
    };
    // Another size: its calls have another signature.
    let other_size = acquire(&s, &specs[..1]).unwrap();
    call(&other_size, "unet", "forward", unet_call(1, 16));
    // Its loop ended: it decodes.
    let decoding = acquire(&s, &specs).unwrap();
    call(&decoding, "unet", "forward", unet_call(2, 8));
    let latents = vec![("latents".to_string(), pattern(&[1, 4, 8, 8], 3.0))];
    call(&decoding, "vae", "decode", latents);
    // Both still hold their leases.
    let lease = acquire(&s, &specs).unwrap();
    let out = call(&lease, "unet", "forward", unet_call(0, 8));
    assert_eq!(out[0].1.size(), [2, 4, 8, 8]);
    assert_eq!(s.stats().batching, BatchStats::default());
    for l in [other_size, decoding, lease] {
        s.release(&l.id).unwrap();
    }
}
