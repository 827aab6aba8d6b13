//! The bad-input suite: distinct bad requests to both services over real gRPC, each answered with
//! the expected status code and a message naming the field; afterwards both services still serve
//! a good request and the store holds no lease.

use autopipe_e2e::*;
use autopipe_proto::v1;
use std::path::{Path, PathBuf};
use tonic::Code;

/// One bad request's expectation and what the server answered.
struct Outcome {
    service: &'static str,
    case: String,
    want: Code,
    field: String,
    got: Result<(), tonic::Status>,
}

impl Outcome {
    fn passed(&self) -> bool {
        matches!(&self.got, Err(s) if s.code() == self.want && s.message().contains(&self.field))
    }
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = scratch_models().join(format!("bad-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A checkpoint folder `name`: sd1-tiny's components linked in, except those in `replace`,
    /// which get the given files instead (`None` = the component folder is missing).
    fn checkpoint(
        &self,
        name: &str,
        model_index: Option<&str>,
        replace: &[(&str, Option<(&str, &str)>)],
    ) -> String {
        let src = sd1_dir();
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        match model_index {
            Some(text) => std::fs::write(dir.join("model_index.json"), text).unwrap(),
            None => {
                std::fs::copy(src.join("model_index.json"), dir.join("model_index.json")).unwrap();
            }
        }
        for component in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
            match replace.iter().find(|(c, _)| *c == component) {
                None => {
                    std::os::unix::fs::symlink(src.join(component), dir.join(component)).unwrap()
                }
                Some((_, None)) => {}
                Some((_, Some((file, text)))) => {
                    let c = dir.join(component);
                    std::fs::create_dir_all(&c).unwrap();
                    for entry in std::fs::read_dir(src.join(component)).unwrap() {
                        let entry = entry.unwrap();
                        if entry.file_name() != *file {
                            std::os::unix::fs::symlink(entry.path(), c.join(entry.file_name()))
                                .unwrap();
                        }
                    }
                    std::fs::write(c.join(file), text).unwrap();
                }
            }
        }
        dir.display().to_string()
    }

    fn empty_dir(&self, name: &str) -> String {
        let dir = self.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sd1_dir() -> PathBuf {
    fixtures()
        .join("checkpoints/sd1-tiny")
        .canonicalize()
        .unwrap()
}

fn text2img() -> v1::GenerateRequest {
    let mut r = reference_request("sd1_t2i_euler");
    r.num_inference_steps = Some(2);
    r
}

fn img2img() -> v1::GenerateRequest {
    reference_request("sd1_i2i_s060")
}

fn inpaint() -> v1::GenerateRequest {
    reference_request("sd1_inpaint_rect_s075")
}

fn with(
    mut r: v1::GenerateRequest,
    edit: impl FnOnce(&mut v1::GenerateRequest),
) -> v1::GenerateRequest {
    edit(&mut r);
    r
}

fn png(w: u32, h: u32) -> Vec<u8> {
    noise_png(w, h, 1, 0)
}

/// The Generate cases: (name, expected code, field named in the message, request).
fn generate_cases(
    scratch: &Scratch,
) -> Vec<(&'static str, Code, &'static str, v1::GenerateRequest)> {
    use Code::*;
    let inpainting_model = fixtures()
        .join("checkpoints/sd-inpaint-tiny")
        .canonicalize()
        .unwrap()
        .display()
        .to_string();
    vec![
        (
            "task unspecified",
            InvalidArgument,
            "task",
            with(text2img(), |r| r.task = 0),
        ),
        (
            "task unknown enum value",
            InvalidArgument,
            "task",
            with(text2img(), |r| r.task = 42),
        ),
        (
            "model missing",
            InvalidArgument,
            "model",
            with(text2img(), |r| r.model.clear()),
        ),
        (
            "model with a NUL byte",
            InvalidArgument,
            "model",
            with(text2img(), |r| r.model = "/tmp/a\0b".into()),
        ),
        (
            "model reference too long",
            InvalidArgument,
            "model",
            with(text2img(), |r| r.model = format!("/{}", "x".repeat(5000))),
        ),
        (
            "model folder not found",
            NotFound,
            "model",
            with(text2img(), |r| {
                r.model = scratch_models()
                    .join("nonexistent/model")
                    .display()
                    .to_string()
            }),
        ),
        (
            "model is not a reference",
            InvalidArgument,
            "model",
            with(text2img(), |r| r.model = "not a model id!".into()),
        ),
        (
            "model folder without model_index.json",
            NotFound,
            "model",
            with(text2img(), |r| r.model = scratch.empty_dir("empty")),
        ),
        (
            "model_index.json malformed",
            FailedPrecondition,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint("bad_index", Some("{ not json"), &[])
            }),
        ),
        (
            "model_index.json names an unknown pipeline",
            InvalidArgument,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint("unknown_pipeline", Some(r#"{"_class_name": "FancyNewPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#), &[])
            }),
        ),
        (
            "model_index.json names an unimplemented pipeline",
            Unimplemented,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint("sd3", Some(r#"{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}"#), &[])
            }),
        ),
        (
            "Kandinsky decoder whose model card names no prior",
            InvalidArgument,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint("kandinsky", Some(r#"{"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#), &[])
            }),
        ),
        (
            "model lacks its unet folder",
            NotFound,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint("no_unet", None, &[("unet", None)])
            }),
        ),
        (
            "scheduler_config.json malformed",
            FailedPrecondition,
            "model",
            with(text2img(), |r| {
                r.model = scratch.checkpoint(
                    "bad_sched",
                    None,
                    &[("scheduler", Some(("scheduler_config.json", "{,")))],
                )
            }),
        ),
        (
            "unet config.json malformed",
            FailedPrecondition,
            "model",
            with(text2img(), |r| {
                r.model =
                    scratch.checkpoint("bad_unet", None, &[("unet", Some(("config.json", "[1,")))])
            }),
        ),
        (
            "inpainting model asked for text2img",
            InvalidArgument,
            "task",
            with(text2img(), |r| r.model = inpainting_model.clone()),
        ),
        (
            "revision with ..",
            InvalidArgument,
            "revision",
            with(text2img(), |r| r.revision = "../../etc".into()),
        ),
        (
            "scheduler unknown",
            InvalidArgument,
            "scheduler",
            with(text2img(), |r| r.scheduler = "FancyScheduler".into()),
        ),
        (
            "scheduler_options not JSON",
            InvalidArgument,
            "scheduler_options",
            with(text2img(), |r| r.scheduler_options = "{oops".into()),
        ),
        (
            "scheduler_options not an object",
            InvalidArgument,
            "scheduler_options",
            with(text2img(), |r| r.scheduler_options = "[true]".into()),
        ),
        (
            "scheduler_options wrong value type",
            InvalidArgument,
            "scheduler_options",
            with(text2img(), |r| {
                r.scheduler = "DPMSolverMultistepScheduler".into();
                r.scheduler_options = r#"{"use_karras_sigmas": "very"}"#.into();
            }),
        ),
        (
            "width not a multiple of 8",
            InvalidArgument,
            "width",
            with(text2img(), |r| r.width = 65),
        ),
        (
            "height not a multiple of 8",
            InvalidArgument,
            "height",
            with(text2img(), |r| r.height = 100),
        ),
        (
            "width too large",
            InvalidArgument,
            "width",
            with(text2img(), |r| r.width = 8192),
        ),
        (
            "height too large",
            InvalidArgument,
            "height",
            with(text2img(), |r| r.height = 4104),
        ),
        (
            "steps 0",
            InvalidArgument,
            "num_inference_steps",
            with(text2img(), |r| r.num_inference_steps = Some(0)),
        ),
        (
            "steps huge",
            InvalidArgument,
            "num_inference_steps",
            with(text2img(), |r| r.num_inference_steps = Some(1_000_000)),
        ),
        (
            "guidance negative",
            InvalidArgument,
            "guidance_scale",
            with(text2img(), |r| r.guidance_scale = Some(-2.0)),
        ),
        (
            "guidance NaN",
            InvalidArgument,
            "guidance_scale",
            with(text2img(), |r| r.guidance_scale = Some(f32::NAN)),
        ),
        (
            "guidance infinite",
            InvalidArgument,
            "guidance_scale",
            with(text2img(), |r| r.guidance_scale = Some(f32::INFINITY)),
        ),
        (
            "strength above 1",
            InvalidArgument,
            "strength",
            with(img2img(), |r| r.strength = Some(1.5)),
        ),
        (
            "strength negative",
            InvalidArgument,
            "strength",
            with(inpaint(), |r| r.strength = Some(-0.25)),
        ),
        (
            "strength NaN",
            InvalidArgument,
            "strength",
            with(img2img(), |r| r.strength = Some(f32::NAN)),
        ),
        (
            "strength leaves no step",
            InvalidArgument,
            "strength",
            with(img2img(), |r| r.strength = Some(0.05)),
        ),
        (
            "strength given to text2img",
            InvalidArgument,
            "strength",
            with(text2img(), |r| r.strength = Some(0.5)),
        ),
        (
            "image given to text2img",
            InvalidArgument,
            "image",
            with(text2img(), |r| r.image = png(64, 64)),
        ),
        (
            "image missing for img2img",
            InvalidArgument,
            "image",
            with(img2img(), |r| r.image.clear()),
        ),
        (
            "image bytes undecodable",
            InvalidArgument,
            "image",
            with(img2img(), |r| r.image = b"GIF89a not really".to_vec()),
        ),
        (
            "image PNG truncated",
            InvalidArgument,
            "image",
            with(inpaint(), |r| r.image.truncate(r.image.len() / 2)),
        ),
        (
            "mask given to img2img",
            InvalidArgument,
            "mask_image",
            with(img2img(), |r| r.mask_image = png(64, 64)),
        ),
        (
            "mask missing for inpaint",
            InvalidArgument,
            "mask_image",
            with(inpaint(), |r| r.mask_image.clear()),
        ),
        (
            "mask size differs from image",
            InvalidArgument,
            "mask_image",
            with(inpaint(), |r| r.mask_image = png(32, 64)),
        ),
        (
            "mask bytes undecodable",
            InvalidArgument,
            "mask_image",
            with(inpaint(), |r| {
                r.mask_image = vec![0x89, b'P', b'N', b'G', 0, 0]
            }),
        ),
        (
            "prompt too long",
            InvalidArgument,
            "prompt",
            with(text2img(), |r| r.prompt = "a cat ".repeat(20_000)),
        ),
        (
            "negative_prompt too long",
            InvalidArgument,
            "negative_prompt",
            with(text2img(), |r| r.negative_prompt = "x".repeat(70_000)),
        ),
        (
            "num_images_per_prompt 0",
            InvalidArgument,
            "num_images_per_prompt",
            with(text2img(), |r| r.num_images_per_prompt = Some(0)),
        ),
        (
            "num_images_per_prompt huge",
            InvalidArgument,
            "num_images_per_prompt",
            with(text2img(), |r| r.num_images_per_prompt = Some(10_000)),
        ),
        (
            "output pixels too many",
            InvalidArgument,
            "num_images_per_prompt",
            with(text2img(), |r| {
                r.width = 4096;
                r.height = 4096;
                r.num_images_per_prompt = Some(4);
            }),
        ),
        (
            "dtype unknown",
            InvalidArgument,
            "dtype",
            with(text2img(), |r| r.dtype = "int4".into()),
        ),
        (
            "variant with a path",
            InvalidArgument,
            "variant",
            with(text2img(), |r| r.variant = "../fp16".into()),
        ),
    ]
}

#[test]
fn bad_requests_get_precise_errors_and_leave_nothing_behind() {
    let split = Split::start(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let mut outcomes = Vec::new();

    // Orchestrator: Generate.
    let mut client = rt.block_on(orchestrator_client(&split.orchestrator.address));
    for (case, want, field, req) in generate_cases(&scratch) {
        let got = rt.block_on(client.generate(req)).map(|_| ());
        outcomes.push(Outcome {
            service: "orchestrator",
            case: format!("Generate: {case}"),
            want,
            field: format!("{field}: "),
            got,
        });
    }
    // A stream reports a bad request as its first (and only) item.
    let got = rt.block_on(async {
        let mut stream = client
            .generate_stream(with(text2img(), |r| r.width = 12))
            .await?
            .into_inner();
        match tokio_stream::StreamExt::next(&mut stream).await {
            Some(Err(s)) => Err(s),
            _ => Ok(()),
        }
    });
    outcomes.push(Outcome {
        service: "orchestrator",
        case: "GenerateStream: width not a multiple of 8".into(),
        want: Code::InvalidArgument,
        field: "width: ".into(),
        got,
    });
    // Orchestrator: Resolve.
    for (case, want, field, req) in [
        (
            "Resolve: task unspecified",
            Code::InvalidArgument,
            "task",
            v1::ResolveRequest {
                model: sd1_dir().display().to_string(),
                ..Default::default()
            },
        ),
        (
            "Resolve: model missing",
            Code::InvalidArgument,
            "model",
            v1::ResolveRequest {
                task: v1::Task::Text2img as i32,
                ..Default::default()
            },
        ),
        (
            "Resolve: model not found",
            Code::NotFound,
            "model",
            v1::ResolveRequest {
                task: v1::Task::Text2img as i32,
                model: scratch_models().join("nonexistent").display().to_string(),
                ..Default::default()
            },
        ),
    ] {
        let got = rt.block_on(client.resolve(req)).map(|_| ());
        outcomes.push(Outcome {
            service: "orchestrator",
            case: case.into(),
            want,
            field: format!("{field}: "),
            got,
        });
    }

    // Store: raw RPCs.
    let mut store = rt.block_on(store_client(&split.store.address));
    store_cases(&rt, &mut store, &scratch, &mut outcomes);

    println!(
        "\n{:<13} {:<58} {:<19} {:<6} message",
        "service", "case", "code", "named"
    );
    let mut failed = Vec::new();
    for o in &outcomes {
        let (code, message) = match &o.got {
            Ok(()) => ("OK".to_string(), String::new()),
            Err(s) => (
                format!("{:?}", s.code()),
                s.message().chars().take(90).collect::<String>(),
            ),
        };
        println!(
            "{:<13} {:<58} {:<19} {:<6} {message}",
            o.service,
            o.case,
            code,
            if o.passed() { "yes" } else { "NO" }
        );
        if !o.passed() {
            failed.push(format!(
                "{}: want {:?} naming {:?}, got {:?}",
                o.case, o.want, o.field, o.got
            ));
        }
    }
    let orchestrator_cases = outcomes
        .iter()
        .filter(|o| o.service == "orchestrator")
        .count();
    println!(
        "{} bad requests ({} orchestrator, {} store): {} answered as expected",
        outcomes.len(),
        orchestrator_cases,
        outcomes.len() - orchestrator_cases,
        outcomes.len() - failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} unexpected answers:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(outcomes.len() >= 40);

    // Both still serve, and nothing is left leased.
    let ok = rt.block_on(client.generate(text2img()));
    assert!(ok.is_ok(), "a good request after the suite: {ok:?}");
    assert_eq!(split.stats().active_leases, 0, "a lease was left behind");
    assert_eq!(
        split.orchestrator.health(),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    assert_eq!(
        split.store.health(),
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
}

fn component(name: &str, class_name: &str, path: &Path) -> v1::ComponentRequest {
    v1::ComponentRequest {
        name: name.into(),
        class_name: class_name.into(),
        path: path.display().to_string(),
        variant: String::new(),
        upcast_half: false,
    }
}

fn tensor(dtype: v1::Dtype, shape: &[i64], data: Vec<u8>) -> Option<v1::Tensor> {
    Some(v1::Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        data,
    })
}

fn f32_tensor(shape: &[i64]) -> Option<v1::Tensor> {
    let n: i64 = shape.iter().product();
    tensor(v1::Dtype::Float32, shape, vec![0u8; n as usize * 4])
}

fn store_cases(
    rt: &tokio::runtime::Runtime,
    store: &mut v1::store_client::StoreClient<tonic::transport::Channel>,
    scratch: &Scratch,
    outcomes: &mut Vec<Outcome>,
) {
    use Code::*;
    let sd1 = sd1_dir();
    let mut push = |case: &str, want: Code, field: &str, got: Result<(), tonic::Status>| {
        outcomes.push(Outcome {
            service: "store",
            case: case.into(),
            want,
            field: field.into(),
            got,
        });
    };
    let acquire = |store: &mut v1::store_client::StoreClient<_>,
                   components: Vec<v1::ComponentRequest>,
                   dtype: &str| {
        rt.block_on(store.acquire(v1::AcquireRequest {
            components,
            dtype: dtype.into(),
            request_id: "bad-input".into(),
        }))
    };

    // Acquire.
    push(
        "Acquire: no components",
        InvalidArgument,
        "components",
        acquire(store, vec![], "").map(|_| ()),
    );
    let unet = || component("unet", "UNet2DConditionModel", &sd1.join("unet"));
    let cases: Vec<(&str, Code, &str, v1::ComponentRequest, &str)> = vec![
        (
            "Acquire: component name missing",
            InvalidArgument,
            "components[0].name",
            v1::ComponentRequest {
                name: String::new(),
                ..unet()
            },
            "",
        ),
        (
            "Acquire: class_name missing",
            InvalidArgument,
            "components[0].class_name",
            v1::ComponentRequest {
                class_name: String::new(),
                ..unet()
            },
            "",
        ),
        (
            "Acquire: path missing",
            InvalidArgument,
            "components[0].path",
            v1::ComponentRequest {
                path: String::new(),
                ..unet()
            },
            "",
        ),
        (
            "Acquire: unknown class",
            Unimplemented,
            "FancyModel",
            v1::ComponentRequest {
                class_name: "FancyModel".into(),
                ..unet()
            },
            "",
        ),
        (
            "Acquire: folder does not exist",
            NotFound,
            "nonexistent/unet",
            component(
                "unet",
                "UNet2DConditionModel",
                &scratch_models().join("nonexistent/unet"),
            ),
            "",
        ),
        (
            "Acquire: folder without weights",
            NotFound,
            "unet",
            component(
                "unet",
                "UNet2DConditionModel",
                Path::new(&scratch.empty_dir("no_weights")),
            ),
            "",
        ),
        (
            "Acquire: unknown dtype",
            InvalidArgument,
            "dtype",
            unet(),
            "int3",
        ),
    ];
    for (case, want, field, c, dtype) in cases {
        push(
            case,
            want,
            field,
            acquire(store, vec![c], dtype).map(|_| ()),
        );
    }
    let bad_config = scratch.checkpoint(
        "bad_unet_config",
        None,
        &[("unet", Some(("config.json", "{\"in_channels\": \"four\"")))],
    );
    push(
        "Acquire: malformed config.json",
        FailedPrecondition,
        "config.json",
        acquire(
            store,
            vec![component(
                "unet",
                "UNet2DConditionModel",
                &Path::new(&bad_config).join("unet"),
            )],
            "",
        )
        .map(|_| ()),
    );

    // A real lease to misuse, and a second one for a handle that is not its own.
    let lease = acquire(
        store,
        vec![
            unet(),
            component("text_encoder", "CLIPTextModel", &sd1.join("text_encoder")),
        ],
        "",
    )
    .expect("good acquire")
    .into_inner();
    let other = acquire(
        store,
        vec![component("vae", "AutoencoderKL", &sd1.join("vae"))],
        "",
    )
    .expect("good acquire")
    .into_inner();
    let handle = |name: &str| {
        lease
            .handles
            .iter()
            .find(|h| h.name == name)
            .unwrap()
            .id
            .clone()
    };
    let (unet_h, te_h) = (handle("unet"), handle("text_encoder"));
    let invoke = |store: &mut v1::store_client::StoreClient<_>,
                  lease_id: &str,
                  handle_id: &str,
                  method: &str,
                  inputs: Vec<v1::NamedTensor>| {
        rt.block_on(store.invoke(v1::InvokeRequest {
            lease_id: lease_id.into(),
            handle_id: handle_id.into(),
            method: method.into(),
            inputs,
            request_id: "bad-input".into(),
        }))
        .map(|_| ())
    };
    let nt = |name: &str, t: Option<v1::Tensor>| v1::NamedTensor {
        name: name.into(),
        tensor: t,
    };
    let ids = |n: i64| tensor(v1::Dtype::Int64, &[1, n], vec![0u8; n as usize * 8]);
    let unet_inputs = |sample: Option<v1::Tensor>| {
        vec![
            nt("sample", sample),
            nt("timestep", f32_tensor(&[])),
            nt("encoder_hidden_states", f32_tensor(&[1, 77, 32])),
        ]
    };

    // Renew / Release / Invoke on leases that do not exist.
    push(
        "Renew: unknown lease",
        FailedPrecondition,
        "lease",
        rt.block_on(store.renew(v1::RenewRequest {
            lease_id: "no-such-lease".into(),
        }))
        .map(|_| ()),
    );
    push(
        "Release: unknown lease",
        FailedPrecondition,
        "lease",
        rt.block_on(store.release(v1::ReleaseRequest {
            lease_id: "no-such-lease".into(),
        }))
        .map(|_| ()),
    );
    push(
        "Invoke: unknown lease",
        FailedPrecondition,
        "lease",
        invoke(
            store,
            "no-such-lease",
            &unet_h,
            "forward",
            unet_inputs(f32_tensor(&[1, 4, 8, 8])),
        ),
    );
    push(
        "Invoke: empty lease id",
        FailedPrecondition,
        "lease",
        invoke(
            store,
            "",
            &unet_h,
            "forward",
            unet_inputs(f32_tensor(&[1, 4, 8, 8])),
        ),
    );
    // Handles.
    push(
        "Invoke: unknown handle",
        InvalidArgument,
        "handle",
        invoke(
            store,
            &lease.lease_id,
            "no-such-handle",
            "forward",
            unet_inputs(f32_tensor(&[1, 4, 8, 8])),
        ),
    );
    push(
        "Invoke: handle of another lease",
        InvalidArgument,
        "handle",
        invoke(
            store,
            &lease.lease_id,
            &other.handles[0].id,
            "decode",
            vec![nt("latents", f32_tensor(&[1, 4, 8, 8]))],
        ),
    );
    // Methods and input names.
    push(
        "Invoke: unknown method",
        InvalidArgument,
        "explode",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "explode",
            unet_inputs(f32_tensor(&[1, 4, 8, 8])),
        ),
    );
    push(
        "Invoke: unexpected input name",
        InvalidArgument,
        "bogus",
        invoke(
            store,
            &lease.lease_id,
            &te_h,
            "encode",
            vec![nt("input_ids", ids(77)), nt("bogus", ids(1))],
        ),
    );
    push(
        "Invoke: required input missing",
        InvalidArgument,
        "input_ids",
        invoke(store, &lease.lease_id, &te_h, "encode", vec![]),
    );
    push(
        "Invoke: unet without timestep",
        InvalidArgument,
        "timestep",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            vec![
                nt("sample", f32_tensor(&[1, 4, 8, 8])),
                nt("encoder_hidden_states", f32_tensor(&[1, 77, 32])),
            ],
        ),
    );
    // Tensors.
    push(
        "Invoke: tensor bytes ≠ dtype × shape",
        InvalidArgument,
        "inputs.sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(tensor(v1::Dtype::Float32, &[1, 4, 8, 8], vec![0; 100])),
        ),
    );
    push(
        "Invoke: named input without tensor",
        InvalidArgument,
        "inputs.sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(None),
        ),
    );
    push(
        "Invoke: DTYPE_UNSPECIFIED",
        InvalidArgument,
        "inputs.input_ids",
        invoke(
            store,
            &lease.lease_id,
            &te_h,
            "encode",
            vec![nt(
                "input_ids",
                tensor(v1::Dtype::Unspecified, &[1, 2], vec![0; 16]),
            )],
        ),
    );
    push(
        "Invoke: unknown dtype enum value",
        InvalidArgument,
        "inputs.input_ids",
        invoke(
            store,
            &lease.lease_id,
            &te_h,
            "encode",
            vec![nt(
                "input_ids",
                Some(v1::Tensor {
                    dtype: 99,
                    shape: vec![1, 2],
                    data: vec![0; 16],
                }),
            )],
        ),
    );
    push(
        "Invoke: negative dimension",
        InvalidArgument,
        "inputs.sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(tensor(v1::Dtype::Float32, &[1, -4, 8, 8], vec![])),
        ),
    );
    push(
        "Invoke: shape overflowing usize",
        InvalidArgument,
        "inputs.sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(tensor(v1::Dtype::Float32, &[i64::MAX, i64::MAX, 4], vec![])),
        ),
    );
    push(
        "Invoke: sample of wrong rank",
        InvalidArgument,
        "sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(f32_tensor(&[4, 8, 8])),
        ),
    );
    push(
        "Invoke: input_ids not int64",
        InvalidArgument,
        "input_ids",
        invoke(
            store,
            &lease.lease_id,
            &te_h,
            "encode",
            vec![nt("input_ids", f32_tensor(&[1, 77]))],
        ),
    );
    push(
        "Invoke: sample with 3 channels",
        InvalidArgument,
        "sample",
        invoke(
            store,
            &lease.lease_id,
            &unet_h,
            "forward",
            unet_inputs(f32_tensor(&[1, 3, 8, 8])),
        ),
    );

    // A released lease is gone for good.
    rt.block_on(store.release(v1::ReleaseRequest {
        lease_id: other.lease_id.clone(),
    }))
    .expect("release");
    push(
        "Invoke: after Release",
        FailedPrecondition,
        "lease",
        invoke(
            store,
            &other.lease_id,
            &other.handles[0].id,
            "decode",
            vec![nt("latents", f32_tensor(&[1, 4, 8, 8]))],
        ),
    );
    push(
        "Release: twice",
        FailedPrecondition,
        "lease",
        rt.block_on(store.release(v1::ReleaseRequest {
            lease_id: other.lease_id.clone(),
        }))
        .map(|_| ()),
    );
    rt.block_on(store.release(v1::ReleaseRequest {
        lease_id: lease.lease_id.clone(),
    }))
    .expect("release");
}
