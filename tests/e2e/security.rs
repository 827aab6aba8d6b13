//! Security end to end, against the real binaries: model references confined to `--model-root`
//! folders (and `--allow-hub`), on `Generate`/`Resolve` of a split orchestrator and of `autopipe
//! serve`, and on the store's own `Acquire`. Every attack is tried twice, once at a target that
//! exists and once at one that does not: both must get the same status and byte-identical messages,
//! or the refusal itself would be a file-system probe. Each test prints the attacks it tried and
//! what each got.

use autopipe_e2e::*;
use autopipe_proto::transport::Address;
use autopipe_proto::v1;
use std::path::{Path, PathBuf};
use tonic::Code;

/// `base/{models, models-evil, outside}`: `models` is a root; the rest is what attacks reach for.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str) -> Self {
        let base = std::env::temp_dir().join(format!("autopipe-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let sd1 = fixtures().join("checkpoints/sd1-tiny");
        let copy = |from: &str, to: &str| {
            let to = base.join(to);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(sd1.join(from), to).unwrap();
        };
        // Real checkpoint-looking folders outside every root.
        copy("model_index.json", "outside/sd1/model_index.json");
        copy("unet/config.json", "outside/sd1/unet/config.json");
        copy("model_index.json", "models-evil/sd1/model_index.json");
        copy("unet/config.json", "models-evil/sd1/unet/config.json");
        std::fs::write(base.join("outside/secret.bin"), b"not for clients").unwrap();
        // Inside the root: a real model (a link into the fixture root, also a root) and escapes.
        let link = |target: &Path, at: &str| {
            let at = base.join(at);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, at).unwrap();
        };
        link(&sd1.canonicalize().unwrap(), "models/sd1");
        link(&base.join("outside/sd1"), "models/link-out");
        link(&base.join("outside/none"), "models/dangling");
        link(&base.join("outside"), "models/nested/out");
        // Component folders whose weight file leaves the root (to a file, or dangling).
        copy("unet/config.json", "models/leaky/unet/config.json");
        link(
            &base.join("outside/secret.bin"),
            "models/leaky/unet/diffusion_pytorch_model.safetensors",
        );
        copy("unet/config.json", "models/leaky-dangling/unet/config.json");
        link(
            &base.join("outside/none.bin"),
            "models/leaky-dangling/unet/diffusion_pytorch_model.safetensors",
        );
        Self(base.canonicalize().unwrap())
    }

    fn path(&self, p: &str) -> String {
        self.0.join(p).display().to_string()
    }

    /// `--model-root` flags: the committed checkpoints and this tree's `models`.
    fn roots(&self) -> Vec<String> {
        let checkpoints = fixtures().join("checkpoints").canonicalize().unwrap();
        vec![
            "--model-root".into(),
            checkpoints.display().to_string(),
            "--model-root".into(),
            self.path("models"),
        ]
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (attack, reference to something that exists, the same kind of reference to nothing).
fn model_attacks(t: &Tree) -> Vec<(&'static str, String, String)> {
    vec![
        (
            "absolute path outside the roots",
            t.path("outside/sd1"),
            t.path("outside/none"),
        ),
        (
            "system folder",
            "/etc".into(),
            "/nonexistent-autopipe".into(),
        ),
        (
            "`..` out of a root (relative)",
            "../outside/sd1".into(),
            "../outside/none".into(),
        ),
        (
            "`..` inside an absolute path",
            t.path("models/../outside/sd1"),
            t.path("models/../outside/none"),
        ),
        (
            "symlink escaping vs dangling link",
            "link-out".into(),
            "dangling".into(),
        ),
        (
            "symlink in the middle of the path",
            "nested/out/sd1".into(),
            "nested/out/none".into(),
        ),
        (
            "a root's prefix-sharing sibling",
            t.path("models-evil/sd1"),
            t.path("models-evil/none"),
        ),
    ]
}

/// One attack's outcome, for the printed table.
struct Row {
    target: &'static str,
    rpc: &'static str,
    attack: String,
    got: Result<(), tonic::Status>,
    /// The missing target's outcome, which must match `got` byte for byte.
    twin: Result<(), tonic::Status>,
    want: Code,
    field: &'static str,
}

impl Row {
    fn passed(&self) -> bool {
        match (&self.got, &self.twin) {
            (Err(a), Err(b)) => {
                a.code() == self.want
                    && b.code() == self.want
                    && a.message() == b.message()
                    && a.message().starts_with(self.field)
            }
            _ => false,
        }
    }
}

fn report(rows: &[Row]) {
    println!(
        "\n{:<14} {:<8} {:<52} {:<18} {:<9} message",
        "target", "rpc", "attack", "code", "identical"
    );
    for r in rows {
        let (code, message) = match &r.got {
            Ok(()) => ("OK".to_string(), String::new()),
            Err(s) => (format!("{:?}", s.code()), s.message().to_string()),
        };
        let identical = match (&r.got, &r.twin) {
            (Err(a), Err(b)) => a.code() == b.code() && a.message() == b.message(),
            _ => false,
        };
        println!(
            "{:<14} {:<8} {:<52} {:<18} {:<9} {message}",
            r.target, r.rpc, r.attack, code, identical
        );
    }
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed()).collect();
    assert!(
        failed.is_empty(),
        "{} attacks not refused as expected: {:?}",
        failed.len(),
        failed
            .iter()
            .map(|r| format!(
                "{} {} {}: {:?} / {:?}",
                r.target, r.rpc, r.attack, r.got, r.twin
            ))
            .collect::<Vec<_>>()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn quick(model: &str) -> v1::GenerateRequest {
    let mut req = reference_request("sd1_t2i_euler");
    req.num_inference_steps = Some(2);
    req.model = model.into();
    req
}

/// Tries every model attack on `Generate`, `Resolve` and a ControlNet reference of the
/// orchestrator at `address`.
fn orchestrator_attacks(
    rt: &tokio::runtime::Runtime,
    target: &'static str,
    address: &Address,
    t: &Tree,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let generate = |req: v1::GenerateRequest| {
        rt.block_on(async { orchestrator_client(address).await.generate(req).await })
            .map(|_| ())
    };
    let resolve = |model: &str| {
        rt.block_on(async {
            orchestrator_client(address)
                .await
                .resolve(v1::ResolveRequest {
                    task: v1::Task::Text2img as i32,
                    model: model.into(),
                    ..Default::default()
                })
                .await
        })
        .map(|_| ())
    };
    let controlnet = |net: &str| {
        let mut req = reference_request("cn_sd1_t2i");
        req.num_inference_steps = Some(2);
        req.controlnet = vec![net.into()];
        generate(req)
    };
    // DeepFloyd IF's stage II: a second model reference in the same request.
    let upscale = |model: &str| {
        let mut req = reference_request("if_t2i_sr");
        req.upscale_model = model.into();
        generate(req)
    };
    for (attack, existing, missing) in model_attacks(t) {
        rows.push(Row {
            target,
            rpc: "Generate",
            attack: attack.into(),
            got: generate(quick(&existing)),
            twin: generate(quick(&missing)),
            want: Code::PermissionDenied,
            field: "model: ",
        });
        rows.push(Row {
            target,
            rpc: "Resolve",
            attack: attack.into(),
            got: resolve(&existing),
            twin: resolve(&missing),
            want: Code::PermissionDenied,
            field: "model: ",
        });
        rows.push(Row {
            target,
            rpc: "Generate",
            attack: format!("controlnet: {attack}"),
            got: controlnet(&existing),
            twin: controlnet(&missing),
            want: Code::PermissionDenied,
            field: "controlnet: ",
        });
        rows.push(Row {
            target,
            rpc: "Generate",
            attack: format!("upscale_model: {attack}"),
            got: upscale(&existing),
            twin: upscale(&missing),
            want: Code::PermissionDenied,
            field: "upscale_model: ",
        });
    }
    // The legitimate path still works: a name relative to a root.
    resolve("sd1").expect("Resolve sd1 (a name under a root)");
    rows
}

#[test]
fn model_references_outside_the_roots_are_refused_alike_whether_or_not_they_exist() {
    let t = Tree::new("security-roots");
    let rt = runtime();
    let roots = t.roots();
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    let split = Split::start_with(&roots, &roots);
    let mut rows = orchestrator_attacks(&rt, "split", &split.orchestrator.address, &t);
    // A name relative to a root generates, over both processes.
    let resp = rt
        .block_on(async {
            orchestrator_client(&split.orchestrator.address)
                .await
                .generate(quick("sd1"))
                .await
        })
        .expect("Generate sd1 (a name under a root)")
        .into_inner();
    assert_eq!(resp.images.len(), 1);

    // The store checks again: component folders and every file in them.
    let mut store = rt.block_on(store_client(&split.store.address));
    let mut acquire = |path: &str| {
        rt.block_on(store.acquire(v1::AcquireRequest {
            components: vec![v1::ComponentRequest {
                name: "unet".into(),
                class_name: "UNet2DConditionModel".into(),
                path: path.into(),
                ..Default::default()
            }],
            ..Default::default()
        }))
        .map(|r| r.into_inner())
    };
    for (attack, existing, missing) in [
        (
            "absolute path outside the roots",
            t.path("outside/sd1/unet"),
            t.path("outside/none/unet"),
        ),
        (
            "`..` inside the path",
            t.path("models/../outside/sd1/unet"),
            t.path("models/../outside/none/unet"),
        ),
        (
            "symlink escaping vs dangling link",
            t.path("models/link-out/unet"),
            t.path("models/dangling/unet"),
        ),
        (
            "a root's prefix-sharing sibling",
            t.path("models-evil/sd1/unet"),
            t.path("models-evil/none/unet"),
        ),
        ("relative path", "sd1/unet".into(), "none/unet".into()),
        (
            "weight file linked out of the root vs dangling",
            t.path("models/leaky/unet"),
            t.path("models/leaky-dangling/unet"),
        ),
    ] {
        rows.push(Row {
            target: "store",
            rpc: "Acquire",
            attack: attack.into(),
            got: acquire(&existing).map(|_| ()),
            twin: acquire(&missing).map(|_| ()),
            want: Code::PermissionDenied,
            field: "components[0].path: ",
        });
    }
    let fine = acquire(&t.path("models/sd1/unet")).expect("Acquire under a root");
    rt.block_on(store.release(v1::ReleaseRequest {
        lease_id: fine.lease_id,
    }))
    .unwrap();
    assert_eq!(split.stats().active_leases, 0, "a refusal leased something");

    // `autopipe serve`: the same checks in one process.
    let addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--threads".into(),
        "1".into(),
    ];
    args.extend(t.roots());
    let serve = Service::start("autopipe", addr, &args);
    rows.extend(orchestrator_attacks(&rt, "serve", &serve.address, &t));
    report(&rows);
}

#[test]
fn hub_repo_ids_outside_the_allowlist_are_refused() {
    let t = Tree::new("security-hub");
    let rt = runtime();
    let addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let hf_home = t.path("hf");
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--allow-hub".into(),
        "acme/*".into(),
        "--allow-hub".into(),
        "other/one".into(),
    ];
    args.extend(t.roots());
    let serve = Service::start_with_env(
        "autopipe",
        addr,
        &args,
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", &hf_home)],
    );
    let resolve = |model: &str| {
        rt.block_on(async {
            orchestrator_client(&serve.address)
                .await
                .resolve(v1::ResolveRequest {
                    task: v1::Task::Text2img as i32,
                    model: model.into(),
                    ..Default::default()
                })
                .await
        })
        .map(|_| ())
    };
    let rows = vec![
        Row {
            target: "serve",
            rpc: "Resolve",
            attack: "hub repo outside --allow-hub".into(),
            got: resolve("evil/model"),
            twin: resolve("other/two"),
            want: Code::PermissionDenied,
            field: "model: ",
        },
        Row {
            target: "serve",
            rpc: "Resolve",
            attack: "namespace that only shares a prefix".into(),
            got: resolve("acme-evil/model"),
            twin: resolve("acmex/model"),
            want: Code::PermissionDenied,
            field: "model: ",
        },
    ];
    // Allowed ids reach the hub client (offline here, nothing cached: NOT_FOUND).
    for allowed in ["acme/model", "other/one"] {
        let e = resolve(allowed).unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{allowed}: {e:?}");
    }
    report(&rows);
}

/// A client call with `token` (`None` = no authorization header).
fn with_token<T>(body: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// What an attack without the right token got.
struct AuthRow {
    target: &'static str,
    rpc: &'static str,
    attack: &'static str,
    got: Result<(), tonic::Status>,
}

fn auth_report(rows: &[AuthRow]) {
    println!(
        "\n{:<8} {:<8} {:<40} {:<18} message",
        "target", "rpc", "attack", "code"
    );
    for r in rows {
        let (code, message) = match &r.got {
            Ok(()) => ("OK".to_string(), String::new()),
            Err(s) => (format!("{:?}", s.code()), s.message().to_string()),
        };
        println!(
            "{:<8} {:<8} {:<40} {code:<18} {message}",
            r.target, r.rpc, r.attack
        );
    }
    for r in rows {
        assert!(
            matches!(&r.got, Err(s) if s.code() == Code::Unauthenticated && s.message().starts_with("authorization: ")),
            "{} {} {}: {:?}",
            r.target,
            r.rpc,
            r.attack,
            r.got
        );
    }
}

/// Tries no token, a wrong one and (after `revoke`) a revoked one on Generate and Resolve; the
/// right token works before the revocation.
fn orchestrator_auth_attacks(
    rt: &tokio::runtime::Runtime,
    target: &'static str,
    address: &Address,
    tokens: &Path,
) -> Vec<AuthRow> {
    let generate = |token: Option<&str>| {
        rt.block_on(async {
            orchestrator_client(address)
                .await
                .generate(with_token(quick("sd1"), token))
                .await
        })
        .map(|_| ())
    };
    let resolve = |token: Option<&str>| {
        rt.block_on(async {
            orchestrator_client(address)
                .await
                .resolve(with_token(
                    v1::ResolveRequest {
                        task: v1::Task::Text2img as i32,
                        model: "sd1".into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await
        })
        .map(|_| ())
    };
    generate(Some("team-a-token")).expect("Generate with the right token");
    resolve(Some("team-b-token")).expect("Resolve with the right token");
    let mut rows = Vec::new();
    for (attack, token) in [
        ("no token", None),
        ("wrong token", Some("team-a-token-guess")),
        ("empty token", Some("")),
        ("a token's prefix", Some("team-a")),
    ] {
        rows.push(AuthRow {
            target,
            rpc: "Generate",
            attack,
            got: generate(token),
        });
        rows.push(AuthRow {
            target,
            rpc: "Resolve",
            attack,
            got: resolve(token),
        });
    }
    // Revoke team-a (the file changes; no restart): its token stops working, team-b's still works.
    std::fs::write(tokens, "# rotated\nteam-b-token\n").unwrap();
    rows.push(AuthRow {
        target,
        rpc: "Generate",
        attack: "revoked token",
        got: generate(Some("team-a-token")),
    });
    rows.push(AuthRow {
        target,
        rpc: "Resolve",
        attack: "revoked token",
        got: resolve(Some("team-a-token")),
    });
    resolve(Some("team-b-token")).expect("Resolve with a token still listed");
    rows
}

#[test]
fn calls_without_a_valid_token_are_unauthenticated_and_probes_stay_open() {
    let t = Tree::new("security-auth");
    let rt = runtime();
    let write = |name: &str, text: &str| {
        let p = t.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let clients = write("clients.tokens", "team-a-token\n# team b\nteam-b-token\n");
    let store_tokens = write("store.tokens", "orchestrator-secret\n");
    let orchestrator_token = write("orchestrator.token", "orchestrator-secret\n");
    let mut store_args = t.roots();
    store_args.extend([
        "--auth-tokens-file".into(),
        store_tokens.display().to_string(),
    ]);
    let mut orchestrator_args = t.roots();
    orchestrator_args.extend([
        "--auth-tokens-file".into(),
        clients.display().to_string(),
        "--store-token-file".into(),
        orchestrator_token.display().to_string(),
    ]);
    let s: Vec<&str> = store_args.iter().map(String::as_str).collect();
    let o: Vec<&str> = orchestrator_args.iter().map(String::as_str).collect();
    // Split::start_with waits for grpc.health.v1 SERVING without a token: probes stay open.
    let split = Split::start_with(&s, &o);
    let mut rows = orchestrator_auth_attacks(&rt, "split", &split.orchestrator.address, &clients);

    // The store accepts only the orchestrator's token.
    let mut store = rt.block_on(store_client(&split.store.address));
    let acquire = |token: Option<&str>| v1::AcquireRequest {
        components: vec![v1::ComponentRequest {
            name: "unet".into(),
            class_name: "UNet2DConditionModel".into(),
            path: t.path("models/sd1/unet"),
            ..Default::default()
        }],
        request_id: token.unwrap_or("none").into(),
        ..Default::default()
    };
    for (attack, token) in [
        ("no token", None),
        ("a client's token", Some("team-b-token")),
        ("wrong token", Some("orchestrator-secret-2")),
    ] {
        let got = rt
            .block_on(store.acquire(with_token(acquire(token), token)))
            .map(|_| ());
        rows.push(AuthRow {
            target: "store",
            rpc: "Acquire",
            attack,
            got,
        });
    }
    let stats = rt
        .block_on(store.stats(with_token(v1::StatsRequest {}, None)))
        .map(|_| ());
    rows.push(AuthRow {
        target: "store",
        rpc: "Stats",
        attack: "no token",
        got: stats,
    });
    let lease = rt
        .block_on(store.acquire(with_token(acquire(None), Some("orchestrator-secret"))))
        .expect("Acquire with the orchestrator's token")
        .into_inner();
    rt.block_on(store.release(with_token(
        v1::ReleaseRequest {
            lease_id: lease.lease_id,
        },
        Some("orchestrator-secret"),
    )))
    .unwrap();
    assert_eq!(
        split.store.health_of("autopipe.v1.Store"),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
        "health needs no token"
    );

    // `autopipe serve`.
    let serve_tokens = write("serve.tokens", "team-a-token\nteam-b-token\n");
    let addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let mut args = vec!["serve".to_string(), "--listen".into(), addr.to_string()];
    args.extend(t.roots());
    args.extend([
        "--auth-tokens-file".into(),
        serve_tokens.display().to_string(),
    ]);
    let serve = Service::start("autopipe", addr, &args);
    rows.extend(orchestrator_auth_attacks(
        &rt,
        "serve",
        &serve.address,
        &serve_tokens,
    ));

    // The CLI sends --token / AUTOPIPE_TOKEN.
    let cli = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(bin("autopipe"));
        cmd.args([
            "resolve",
            "--server",
            &serve.address.to_string(),
            "--model",
            "sd1",
        ]);
        cmd.env_remove("AUTOPIPE_TOKEN");
        if let Some(t) = token {
            cmd.env("AUTOPIPE_TOKEN", t);
        }
        cmd.output().expect("run autopipe resolve")
    };
    let ok = cli(Some("team-b-token"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = cli(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    auth_report(&rows);
}

/// Limits small enough to test cheaply; each case below goes one over one of them.
const LIMIT_FLAGS: [&str; 10] = [
    "--max-request-bytes",
    "200000",
    "--max-image-pixels",
    "4096",
    "--max-prompt-bytes",
    "16",
    "--max-images-per-request",
    "2",
    "--max-steps",
    "5",
];

/// (attack, request, code, field, flag).
fn limit_cases() -> Vec<(
    &'static str,
    v1::GenerateRequest,
    Code,
    &'static str,
    &'static str,
)> {
    let with = |case: &str, f: &dyn Fn(&mut v1::GenerateRequest)| {
        let mut req = reference_request(case);
        req.model = "sd1".into();
        req.num_inference_steps = Some(2);
        // Within --max-prompt-bytes, whatever the reference case says.
        (req.prompt, req.negative_prompt) = ("a red cube".into(), String::new());
        f(&mut req);
        req
    };
    let big = || noise_png(72, 72, 7, 0);
    vec![
        (
            "request message over the byte limit",
            with("sd1_i2i_s060", &|r| r.image = noise_png(64, 64, 1, 300_000)),
            Code::ResourceExhausted,
            "request: ",
            "--max-request-bytes",
        ),
        (
            "prompt over the byte limit",
            with("sd1_t2i_euler", &|r| r.prompt = "x".repeat(17)),
            Code::InvalidArgument,
            "prompt: ",
            "--max-prompt-bytes",
        ),
        (
            "negative prompt over the byte limit",
            with("sd1_t2i_euler", &|r| r.negative_prompt = "y".repeat(40)),
            Code::InvalidArgument,
            "negative_prompt: ",
            "--max-prompt-bytes",
        ),
        (
            "too many images",
            with("sd1_t2i_euler", &|r| r.num_images_per_prompt = Some(3)),
            Code::InvalidArgument,
            "num_images_per_prompt: ",
            "--max-images-per-request",
        ),
        (
            "too many steps",
            with("sd1_t2i_euler", &|r| r.num_inference_steps = Some(6)),
            Code::InvalidArgument,
            "num_inference_steps: ",
            "--max-steps",
        ),
        (
            "too many prior steps",
            with("sd1_t2i_euler", &|r| r.prior_num_inference_steps = Some(6)),
            Code::InvalidArgument,
            "prior_num_inference_steps: ",
            "--max-steps",
        ),
        (
            "too many upscale steps",
            with("if_t2i_sr", &|r| r.upscale_num_inference_steps = Some(6)),
            Code::InvalidArgument,
            "upscale_num_inference_steps: ",
            "--max-steps",
        ),
        (
            "output over the pixel limit",
            with("sd1_t2i_euler", &|r| (r.width, r.height) = (64, 72)),
            Code::InvalidArgument,
            "width: ",
            "--max-image-pixels",
        ),
        (
            "input image over the pixel limit",
            with("sd1_i2i_s060", &|r| r.image = big()),
            Code::InvalidArgument,
            "image: ",
            "--max-image-pixels",
        ),
        (
            "mask over the pixel limit",
            with("sdinp_inpaint_soft_s075", &|r| r.mask_image = big()),
            Code::InvalidArgument,
            "mask_image: ",
            "--max-image-pixels",
        ),
        (
            "control image over the pixel limit",
            with("cn_sd1_t2i", &|r| r.control_image = vec![big()]),
            Code::InvalidArgument,
            "control_image[0]: ",
            "--max-image-pixels",
        ),
    ]
}

#[test]
fn each_limit_refuses_naming_the_field_the_limit_and_the_flag() {
    let t = Tree::new("security-limits");
    let rt = runtime();
    let mut args = t.roots();
    args.extend(LIMIT_FLAGS.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let split = Split::start_with(
        &t.roots().iter().map(String::as_str).collect::<Vec<_>>(),
        &a,
    );
    let addr = Address::Tcp(format!("127.0.0.1:{}", free_port()));
    let mut serve_args = vec!["serve".to_string(), "--listen".into(), addr.to_string()];
    serve_args.extend(args.clone());
    let serve = Service::start("autopipe", addr, &serve_args);
    // --max-deadline 0: every request is over its cap, whatever grpc-timeout the client set.
    let mut capped_args = t.roots();
    capped_args.extend(["--max-deadline".to_string(), "0".into()]);
    let capped = start_orchestrator(
        &split.store.address,
        &capped_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    println!("\n{:<7} {:<38} {:<18} message", "target", "attack", "code");
    let mut failed = Vec::new();
    for (target, address) in [
        ("split", &split.orchestrator.address),
        ("serve", &serve.address),
    ] {
        for (attack, req, code, field, flag) in limit_cases() {
            let got = rt.block_on(async { orchestrator_client(address).await.generate(req).await });
            let (got_code, message) = match &got {
                Ok(_) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_string()),
            };
            println!(
                "{target:<7} {attack:<38} {:<18} {message}",
                format!("{got_code:?}")
            );
            if got_code != code || !message.starts_with(field) || !message.contains(flag) {
                failed.push(format!("{target} {attack}: {got_code:?} {message}"));
            }
        }
        // Within every limit, the same server generates.
        let mut within = quick("sd1");
        (within.prompt, within.negative_prompt) = ("a red cube".into(), String::new());
        let ok = rt.block_on(async { orchestrator_client(address).await.generate(within).await });
        assert!(ok.is_ok(), "{target}: {ok:?}");
    }
    let mut req = tonic::Request::new(quick("sd1"));
    req.set_timeout(std::time::Duration::from_secs(3600));
    let got = rt
        .block_on(async {
            orchestrator_client(&capped.address)
                .await
                .generate(req)
                .await
        })
        .unwrap_err();
    println!(
        "{:<7} {:<38} {:<18} {}",
        "split",
        "deadline over --max-deadline",
        format!("{:?}", got.code()),
        got.message()
    );
    assert_eq!(got.code(), Code::DeadlineExceeded, "{got:?}");
    assert!(got.message().contains("--max-deadline"), "{got:?}");
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(
        split.stats().active_leases,
        0,
        "a refused request leased something"
    );
}

#[test]
fn the_limits_and_their_defaults_are_in_help() {
    for (binary, args) in [
        ("autopipe-orchestrator", vec!["--help"]),
        ("autopipe", vec!["serve", "--help"]),
    ] {
        let out = std::process::Command::new(bin(binary))
            .args(&args)
            .output()
            .expect("--help");
        let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for (flag, default) in [
            ("--max-request-bytes", "33554432"),
            ("--max-image-pixels", "4194304"),
            ("--max-prompt-bytes", "4096"),
            ("--max-images-per-request", "4"),
            ("--max-steps", "150"),
            ("--max-concurrent-streams", "16"),
            ("--max-deadline", "600"),
        ] {
            let at = help
                .find(&format!("{flag} <"))
                .unwrap_or_else(|| panic!("{binary}: no {flag} in --help"));
            let rest = &help[at..];
            let end = rest[2..].find(" --").map_or(rest.len(), |i| i + 2);
            assert!(
                rest[..end].contains(&format!("[default: {default}]")),
                "{binary} {flag}: {}",
                &rest[..end]
            );
        }
    }
}

/// A store whose component calls wait at a gate the test opens: a request held in flight for as
/// long as the test needs, with no timing involved.
struct GatedStore {
    inner: autopipe_store::Store,
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    open: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl autopipe_store::ComponentStore for GatedStore {
    fn acquire(
        &self,
        request: &autopipe_store::AcquireRequest,
    ) -> Result<autopipe_store::Lease, autopipe_store::StoreError> {
        self.inner.acquire(request)
    }
    fn renew(&self, lease_id: &str) -> Result<std::time::Duration, autopipe_store::StoreError> {
        self.inner.renew(lease_id)
    }
    fn release(&self, lease_id: &str) -> Result<(), autopipe_store::StoreError> {
        self.inner.release(lease_id)
    }
    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: autopipe_store::Tensors,
        request_id: &str,
    ) -> Result<autopipe_store::Tensors, autopipe_store::StoreError> {
        let _ = self.entered.lock().unwrap().send(());
        let (open, cv) = &*self.open;
        let _open = cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
        self.inner
            .invoke(lease_id, handle_id, method, inputs, request_id)
    }
}

#[test]
fn calls_beyond_max_concurrent_streams_on_one_connection_are_resource_exhausted() {
    use autopipe_orchestrator::{serve, Limits, Orchestrator, OrchestratorConfig, ServeOptions};
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let open = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let store = std::sync::Arc::new(GatedStore {
        inner: autopipe_store::Store::new(autopipe_store::StoreConfig::default()),
        entered: std::sync::Mutex::new(entered_tx),
        open: open.clone(),
    });
    let orchestrator = std::sync::Arc::new(Orchestrator::new(store, OrchestratorConfig::default()));
    let rt = runtime();
    let options = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_concurrency: 4,
        max_queue: 4,
        drain_timeout: std::time::Duration::from_secs(1),
        metrics_listen: None,
        preload: Vec::new(),
        auth: Default::default(),
        limits: Limits {
            max_concurrent_streams: 1,
            ..Limits::unlimited()
        },
        tls: None,
        health_listen: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(serve(
        orchestrator,
        options,
        std::future::pending(),
        Some(tx),
    ));
    let addr = rt.block_on(rx).unwrap();
    let sd1 = fixtures()
        .join("checkpoints/sd1-tiny")
        .canonicalize()
        .unwrap();
    let resolve = v1::ResolveRequest {
        task: v1::Task::Text2img as i32,
        model: sd1.display().to_string(),
        ..Default::default()
    };
    // One connection: a Generate held at the store's gate, then a second call on it.
    let client = rt.block_on(orchestrator_client(&addr));
    let mut first = client.clone();
    let held = rt.spawn(async move { first.generate(quick(&sd1.display().to_string())).await });
    entered.recv().expect("the Generate reached the store");
    let mut second = client.clone();
    let refused = rt.block_on(second.resolve(resolve.clone())).unwrap_err();
    println!(
        "second call on the connection: {:?} {}",
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().starts_with("streams: ")
            && refused.message().contains("--max-concurrent-streams"),
        "{refused:?}"
    );
    // Another connection has its own allowance.
    rt.block_on(async {
        orchestrator_client(&addr)
            .await
            .resolve(resolve.clone())
            .await
    })
    .expect("Resolve on a second connection");
    *open.0.lock().unwrap() = true;
    open.1.notify_all();
    rt.block_on(held)
        .unwrap()
        .expect("the held Generate finishes");
    // Its slot is given back: the connection takes calls again.
    rt.block_on(second.resolve(resolve))
        .expect("Resolve after the first call ended");
}
