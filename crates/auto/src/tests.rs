//! Checks against tables produced by diffusers itself (`scripts/fixtures/auto_table.py`), plus the
//! named quirks spelled out.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::*;

const TABLE: &str = include_str!("../tests/diffusers_table.json");
const TABLE_EXT: &str = include_str!("../tests/diffusers_table_ext.json");
const PIPELINES: &str = include_str!("../tests/diffusers_pipelines.json");

#[derive(Deserialize)]
struct Table {
    diffusers_version: String,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    class: String,
    task: Task,
    controlnet: bool,
    pipeline: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TableExt {
    table_classes: usize,
    classes: Vec<String>,
    cases: Vec<Case>,
    strings: Vec<String>,
    results: BTreeMap<Task, Vec<Vec<usize>>>,
}

#[derive(Deserialize)]
struct Case {
    mode: String,
    controlnet: String,
    enable_pag: String,
}

#[derive(Deserialize)]
struct Pipelines {
    pipelines: BTreeMap<String, PipelineInfo>,
    connected_pipeline: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct PipelineInfo {
    components: Vec<(String, String, bool)>,
    load_connected_pipes: bool,
    prior_pipeline: Option<String>,
}

fn table() -> Table {
    serde_json::from_str(TABLE).expect("diffusers_table.json parses")
}

fn message(result: &Result<Resolution, Error>) -> String {
    match result {
        Ok(r) => r.pipeline.to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_table_row_matches_diffusers() {
    let table = table();
    assert_eq!(table.diffusers_version, "0.42.1");
    // 119 table classes + 6 unknown names, x 3 tasks x controlnet off/on.
    assert_eq!(table.rows.len(), 125 * 3 * 2);
    let mut mismatches = Vec::new();
    for row in &table.rows {
        let got = resolve(&row.class, row.task, row.controlnet);
        let ok = match (&got, &row.pipeline, &row.error) {
            (Ok(r), Some(want), None) => r.pipeline == want,
            (Err(e), None, Some(want)) => &e.to_string() == want,
            _ => false,
        };
        if !ok {
            mismatches.push(format!(
                "{} {} controlnet={}: got {:?}, diffusers {:?}",
                row.class,
                row.task,
                row.controlnet,
                message(&got),
                row.pipeline.as_ref().or(row.error.as_ref())
            ));
        }
        // The variant says whether the checkpoint's class is known at all.
        if let Err(e) = &got {
            match e {
                Error::UnknownClass(_) => assert!(!is_known_class(&row.class), "{}", row.class),
                Error::NotLinked { task, .. } => {
                    assert!(is_known_class(&row.class), "{}", row.class);
                    assert_eq!(*task, row.task);
                }
                Error::InvalidTask(_) => panic!("InvalidTask from resolve"),
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn every_kwargs_case_matches_diffusers() {
    let ext: TableExt = serde_json::from_str(TABLE_EXT).expect("diffusers_table_ext.json parses");
    assert_eq!(ext.cases.len(), 18);
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for (task, per_class) in &ext.results {
        assert_eq!(per_class.len(), ext.classes.len());
        for (class, per_case) in ext.classes.iter().zip(per_class) {
            for (case, &want) in ext.cases.iter().zip(per_case) {
                let controlnet = match case.controlnet.as_str() {
                    "absent" => ControlNetKwarg::Absent,
                    "model" => ControlNetKwarg::Model,
                    "union" => ControlNetKwarg::Union,
                    "none" => ControlNetKwarg::ExplicitNone,
                    other => panic!("case controlnet {other}"),
                };
                let enable_pag = match case.enable_pag.as_str() {
                    "absent" => None,
                    "true" => Some(true),
                    "false" => Some(false),
                    other => panic!("case enable_pag {other}"),
                };
                let kwargs = Kwargs {
                    controlnet,
                    enable_pag,
                };
                let got = match case.mode.as_str() {
                    "from_pretrained" => resolve_from_pretrained(class, *task, kwargs),
                    "from_pipe" => resolve_from_pipe(class, *task, kwargs),
                    other => panic!("case mode {other}"),
                };
                let got = match got {
                    Ok(r) => r.pipeline.to_string(),
                    Err(Error::NotLinked {
                        class_name,
                        model_name,
                        ..
                    }) => format!("!{class_name}|{}", model_name.unwrap_or("None")),
                    Err(Error::UnknownClass(class_name)) => format!("!{class_name}|None"),
                    Err(e) => panic!("{e}"),
                };
                if got != ext.strings[want] {
                    mismatches.push(format!(
                        "{class} {task} {} controlnet={} enable_pag={}: got {got}, diffusers {}",
                        case.mode, case.controlnet, case.enable_pag, ext.strings[want]
                    ));
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 125 * 3 * 18);
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn tables_hold_exactly_diffusers_classes() {
    let ext: TableExt = serde_json::from_str(TABLE_EXT).expect("diffusers_table_ext.json parses");
    let ours: Vec<&str> = tables::all_classes().collect();
    let theirs: Vec<&str> = ext.classes[..ext.table_classes]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(ours, theirs);
    for extra in &ext.classes[ext.table_classes..] {
        assert!(!is_known_class(extra), "{extra}");
    }
}

#[test]
fn components_match_diffusers_init_signatures() {
    let fixture: Pipelines = serde_json::from_str(PIPELINES).expect("diffusers_pipelines.json");
    for spec in pipelines::PIPELINES {
        let info = fixture
            .pipelines
            .get(spec.name)
            .unwrap_or_else(|| panic!("{} not in fixture", spec.name));
        let ours: Vec<(String, String, bool)> = spec
            .components
            .iter()
            .map(|s| (s.name.to_string(), s.class.to_string(), s.optional))
            .collect();
        assert_eq!(ours, info.components, "{}", spec.name);
    }
    // 15 SD/SDXL/IF pipelines + 2 x (3 Combined + 3 decoders + 1 prior).
    assert_eq!(pipelines::PIPELINES.len(), 29);
}

#[test]
fn connected_priors_match_diffusers() {
    let fixture: Pipelines = serde_json::from_str(PIPELINES).expect("diffusers_pipelines.json");
    for (name, info) in &fixture.pipelines {
        let ours = pipelines::connected_prior(name);
        assert_eq!(ours.is_some(), info.load_connected_pipes, "{name}");
        assert_eq!(ours, info.prior_pipeline.as_deref(), "{name}");
    }
    assert_eq!(pipelines::CONNECTED_PRIORS.len(), 8);
}

#[test]
fn connected_pipeline_matches_diffusers() {
    let fixture: Pipelines = serde_json::from_str(PIPELINES).expect("diffusers_pipelines.json");
    for class in tables::all_classes() {
        assert_eq!(
            connected_pipeline(class),
            fixture.connected_pipeline.get(class).map(String::as_str),
            "{class}"
        );
    }
    assert_eq!(fixture.connected_pipeline.len(), 8);
}

#[test]
fn in_scope_resolutions_carry_components() {
    let mut families = BTreeSet::new();
    for class in tables::all_classes() {
        for task in Task::ALL {
            for controlnet in [false, true] {
                let Ok(r) = resolve(class, task, controlnet) else {
                    continue;
                };
                assert_eq!(
                    r.family.in_scope(),
                    !r.components.is_empty(),
                    "{}",
                    r.pipeline
                );
                if r.family.in_scope() {
                    families.insert(format!("{:?}", r.family));
                    let has_controlnet = r.component("controlnet").is_some();
                    let controlnet_family = matches!(
                        r.family,
                        Family::StableDiffusionControlNet | Family::StableDiffusionXLControlNet
                    );
                    assert_eq!(has_controlnet, controlnet_family, "{}", r.pipeline);
                }
            }
        }
    }
    assert_eq!(families.len(), 7, "{families:?}");
}

fn pipeline(class: &str, task: Task, controlnet: bool) -> &'static str {
    match resolve(class, task, controlnet) {
        Ok(r) => r.pipeline,
        Err(e) => panic!("{class} {task} {controlnet}: {e}"),
    }
}

fn error(class: &str, task: Task, controlnet: bool) -> Error {
    match resolve(class, task, controlnet) {
        Ok(r) => panic!("{class} {task} {controlnet} resolved {}", r.pipeline),
        Err(e) => e,
    }
}

#[test]
fn stable_diffusion_switches_task_and_adds_controlnet() {
    let sd = "StableDiffusionPipeline";
    assert_eq!(
        pipeline(sd, Task::Text2Img, false),
        "StableDiffusionPipeline"
    );
    assert_eq!(
        pipeline(sd, Task::Img2Img, false),
        "StableDiffusionImg2ImgPipeline"
    );
    assert_eq!(
        pipeline(sd, Task::Inpaint, false),
        "StableDiffusionInpaintPipeline"
    );
    assert_eq!(
        pipeline(sd, Task::Text2Img, true),
        "StableDiffusionControlNetPipeline"
    );
    assert_eq!(
        pipeline(sd, Task::Img2Img, true),
        "StableDiffusionControlNetImg2ImgPipeline"
    );
    assert_eq!(
        pipeline(sd, Task::Inpaint, true),
        "StableDiffusionControlNetInpaintPipeline"
    );
    let r = resolve(sd, Task::Text2Img, false).expect("resolves");
    assert_eq!(r.family, Family::StableDiffusion);
    let names: Vec<&str> = r.components.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "vae",
            "text_encoder",
            "tokenizer",
            "unet",
            "scheduler",
            "safety_checker",
            "feature_extractor",
            "image_encoder"
        ]
    );
    assert!(r.component("safety_checker").is_some_and(|s| s.optional));
    assert!(r.component("unet").is_some_and(|s| !s.optional));
}

#[test]
fn sdxl_refiner_quirks() {
    let refiner = "StableDiffusionXLImg2ImgPipeline";
    assert_eq!(
        pipeline(refiner, Task::Text2Img, false),
        "StableDiffusionXLPipeline"
    );
    assert_eq!(
        pipeline(refiner, Task::Inpaint, false),
        "StableDiffusionXLInpaintPipeline"
    );
    // "Img2Img" in the name makes img2img rewrite "Img2ImgPipeline": the right class.
    assert_eq!(
        pipeline(refiner, Task::Img2Img, true),
        "StableDiffusionXLControlNetImg2ImgPipeline"
    );
    // Text2img rewrites "Pipeline", which no table holds.
    let e = error(refiner, Task::Text2Img, true);
    assert_eq!(
        e.to_string(),
        "AutoPipeline can't find a pipeline linked to StableDiffusionXLImg2ImgControlNetPipeline for None"
    );
    assert!(matches!(
        e,
        Error::NotLinked {
            model_name: None,
            ..
        }
    ));
    // So does inpainting (the name has no "Inpaint").
    assert_eq!(
        error(refiner, Task::Inpaint, true).to_string(),
        "AutoPipeline can't find a pipeline linked to StableDiffusionXLImg2ImgControlNetPipeline for None"
    );
    let r = resolve(refiner, Task::Img2Img, false).expect("resolves");
    assert_eq!(r.family, Family::StableDiffusionXL);
    // The refiner has no text_encoder/tokenizer: optional in SDXL pipelines.
    assert!(r.component("text_encoder").is_some_and(|s| s.optional));
    assert!(r.component("tokenizer").is_some_and(|s| s.optional));
}

#[test]
fn inpaint_checkpoint_quirks() {
    let inpaint = "StableDiffusionInpaintPipeline";
    assert_eq!(
        pipeline(inpaint, Task::Text2Img, false),
        "StableDiffusionPipeline"
    );
    assert_eq!(
        pipeline(inpaint, Task::Img2Img, false),
        "StableDiffusionImg2ImgPipeline"
    );
    assert_eq!(
        pipeline(inpaint, Task::Inpaint, true),
        "StableDiffusionControlNetInpaintPipeline"
    );
    for task in [Task::Text2Img, Task::Img2Img] {
        assert_eq!(
            error(inpaint, task, true).to_string(),
            "AutoPipeline can't find a pipeline linked to StableDiffusionInpaintControlNetPipeline for None"
        );
    }
    let sdxl_inpaint = "StableDiffusionXLInpaintPipeline";
    assert_eq!(
        pipeline(sdxl_inpaint, Task::Text2Img, false),
        "StableDiffusionXLPipeline"
    );
    assert_eq!(
        pipeline(sdxl_inpaint, Task::Inpaint, true),
        "StableDiffusionXLControlNetInpaintPipeline"
    );
}

#[test]
fn controlnet_checkpoint_keeps_or_doubles_controlnet() {
    let cn = "StableDiffusionControlNetPipeline";
    assert_eq!(
        pipeline(cn, Task::Img2Img, false),
        "StableDiffusionControlNetImg2ImgPipeline"
    );
    // from_pretrained inserts "ControlNet" again.
    assert_eq!(
        error(cn, Task::Text2Img, true).to_string(),
        "AutoPipeline can't find a pipeline linked to StableDiffusionControlNetControlNetPipeline for None"
    );
    // from_pipe strips it first, and controlnet=None removes it.
    let with = Kwargs {
        controlnet: ControlNetKwarg::Model,
        enable_pag: None,
    };
    let without = Kwargs {
        controlnet: ControlNetKwarg::ExplicitNone,
        enable_pag: None,
    };
    let from_pipe = |task, kwargs| resolve_from_pipe(cn, task, kwargs).map(|r| r.pipeline);
    assert_eq!(
        from_pipe(Task::Text2Img, with),
        Ok("StableDiffusionControlNetPipeline")
    );
    assert_eq!(
        from_pipe(Task::Inpaint, without),
        Ok("StableDiffusionInpaintPipeline")
    );
    assert_eq!(
        from_pipe(Task::Img2Img, without),
        Ok("StableDiffusionImg2ImgPipeline")
    );
}

#[test]
fn deepfloyd_if_inpainting_ignores_controlnet() {
    // "IFInpaintingPipeline" contains "Inpaint" but not "InpaintPipeline": nothing is rewritten.
    assert_eq!(
        pipeline("IFInpaintingPipeline", Task::Inpaint, true),
        "IFInpaintingPipeline"
    );
    assert_eq!(
        pipeline("IFPipeline", Task::Inpaint, false),
        "IFInpaintingPipeline"
    );
    assert_eq!(
        pipeline("IFPipeline", Task::Img2Img, false),
        "IFImg2ImgPipeline"
    );
    assert_eq!(
        error("IFPipeline", Task::Text2Img, true).to_string(),
        "AutoPipeline can't find a pipeline linked to IFControlNetPipeline for None"
    );
    let r = resolve("IFPipeline", Task::Text2Img, false).expect("resolves");
    assert_eq!(r.family, Family::DeepFloydIF);
    assert!(r
        .component("text_encoder")
        .is_some_and(|s| s.class == "T5EncoderModel"));
}

#[test]
fn kandinsky_decoder_checkpoints_resolve_to_combined_pipelines() {
    for (decoder, family, prior, combined) in [
        (
            "KandinskyV22Pipeline",
            Family::Kandinsky22,
            "KandinskyV22PriorPipeline",
            [
                "KandinskyV22CombinedPipeline",
                "KandinskyV22Img2ImgCombinedPipeline",
                "KandinskyV22InpaintCombinedPipeline",
            ],
        ),
        (
            "KandinskyPipeline",
            Family::Kandinsky21,
            "KandinskyPriorPipeline",
            [
                "KandinskyCombinedPipeline",
                "KandinskyImg2ImgCombinedPipeline",
                "KandinskyInpaintCombinedPipeline",
            ],
        ),
    ] {
        for (task, want) in Task::ALL.into_iter().zip(combined) {
            let r = resolve(decoder, task, false).expect("resolves");
            assert_eq!(r.pipeline, want);
            assert_eq!(r.family, family);
            assert_eq!(r.connected_prior, Some(prior));
            // The prior_* slots are the prior pipeline's components, prefixed.
            let from_prior: Vec<&str> = r
                .components
                .iter()
                .filter_map(|s| {
                    s.connected().map(|(key, name)| {
                        assert_eq!(key, "prior");
                        name
                    })
                })
                .collect();
            let prior_components: Vec<&str> = pipeline_components(prior)
                .expect("prior in scope")
                .iter()
                .map(|s| s.name)
                .collect();
            assert_eq!(from_prior, prior_components);
            // The rest are the decoder's own components.
            let mut own: Vec<&str> = r
                .components
                .iter()
                .filter(|s| s.connected().is_none())
                .map(|s| s.name)
                .collect();
            let mut decoder_own: Vec<&str> = pipeline_components(decoder)
                .expect("decoder in scope")
                .iter()
                .map(|s| s.name)
                .collect();
            own.sort_unstable();
            decoder_own.sort_unstable();
            assert_eq!(own, decoder_own);
        }
        // No Kandinsky ControlNet in the tables.
        assert!(matches!(
            error(decoder, Task::Text2Img, true),
            Error::NotLinked {
                model_name: None,
                ..
            }
        ));
        assert_eq!(
            connected_pipeline(decoder),
            Some(pipeline(decoder, Task::Text2Img, false))
        );
    }
    assert_eq!(
        pipeline("KandinskyV22Img2ImgPipeline", Task::Inpaint, false),
        "KandinskyV22InpaintCombinedPipeline"
    );
    // A prior checkpoint is in no table.
    assert_eq!(
        error("KandinskyV22PriorPipeline", Task::Text2Img, false),
        Error::UnknownClass("KandinskyV22PriorPipeline".into())
    );
    let sd = resolve("StableDiffusionPipeline", Task::Text2Img, false).expect("resolves");
    assert_eq!(sd.connected_prior, None);
}

#[test]
fn out_of_scope_families_resolve_as_other() {
    let r = resolve("FluxPipeline", Task::Inpaint, false).expect("resolves");
    assert_eq!(r.pipeline, "FluxInpaintPipeline");
    assert_eq!(r.family, Family::Other);
    assert!(r.components.is_empty());
    assert!(!r.family.in_scope());
    // Flux tools checkpoints: "ControlPipeline" is what gets rewritten.
    assert_eq!(
        pipeline("FluxControlPipeline", Task::Img2Img, false),
        "FluxControlImg2ImgPipeline"
    );
    // A video class is known, but not linked to an image task.
    assert_eq!(
        error("WanPipeline", Task::Text2Img, false),
        Error::NotLinked {
            class_name: "WanPipeline".into(),
            model_name: Some("wan"),
            task: Task::Text2Img
        }
    );
    assert_eq!(
        error("WanPipeline", Task::Text2Img, false).to_string(),
        "AutoPipeline can't find a pipeline linked to WanPipeline for wan"
    );
    // Stable Cascade is connected too, though out of scope.
    let cascade = resolve("StableCascadeDecoderPipeline", Task::Text2Img, false).expect("resolves");
    assert_eq!(cascade.pipeline, "StableCascadeCombinedPipeline");
    assert_eq!(cascade.connected_prior, Some("StableCascadePriorPipeline"));
}

#[test]
fn pag_and_union_rewrites() {
    let pag = Kwargs {
        controlnet: ControlNetKwarg::Absent,
        enable_pag: Some(true),
    };
    let r = resolve_from_pretrained("StableDiffusionXLPipeline", Task::Img2Img, pag);
    assert_eq!(
        r.map(|r| r.pipeline),
        Ok("StableDiffusionXLPAGImg2ImgPipeline")
    );
    let union = Kwargs {
        controlnet: ControlNetKwarg::Union,
        enable_pag: None,
    };
    let r = resolve_from_pretrained("StableDiffusionXLPipeline", Task::Inpaint, union);
    assert_eq!(
        r.map(|r| r.pipeline),
        Ok("StableDiffusionXLControlNetUnionInpaintPipeline")
    );
    // controlnet=None still counts as "controlnet passed" in from_pretrained.
    let none = Kwargs {
        controlnet: ControlNetKwarg::ExplicitNone,
        enable_pag: None,
    };
    let r = resolve_from_pretrained("StableDiffusionPipeline", Task::Text2Img, none);
    assert_eq!(
        r.map(|r| r.pipeline),
        Ok("StableDiffusionControlNetPipeline")
    );
}

#[test]
fn unknown_class_is_diffusers_none_error() {
    let e = error("NotAPipeline", Task::Text2Img, false);
    assert_eq!(e, Error::UnknownClass("NotAPipeline".into()));
    assert_eq!(
        e.to_string(),
        "AutoPipeline can't find a pipeline linked to NotAPipeline for None"
    );
    // The message names the rewritten class, as diffusers' does.
    assert_eq!(
        error("NotAPipeline", Task::Img2Img, true).to_string(),
        "AutoPipeline can't find a pipeline linked to NotAControlNetPipeline for None"
    );
    assert_eq!(
        error("", Task::Inpaint, false),
        Error::UnknownClass(String::new())
    );
}

#[test]
fn task_names_round_trip() {
    for task in Task::ALL {
        assert_eq!(task.to_string().parse::<Task>(), Ok(task));
        let json = serde_json::to_string(&task).expect("serializes");
        assert_eq!(json, format!("\"{task}\""));
    }
    assert_eq!("text2img".parse::<Task>(), Ok(Task::Text2Img));
    assert_eq!(
        "Text2Img".parse::<Task>(),
        Err(Error::InvalidTask("Text2Img".into()))
    );
    assert_eq!(
        Task::Inpaint.auto_pipeline_class(),
        "AutoPipelineForInpainting"
    );
}

#[test]
fn model_names_follow_search_order() {
    assert_eq!(
        model_name("StableDiffusionXLImg2ImgPipeline"),
        Some("stable-diffusion-xl")
    );
    assert_eq!(model_name("KandinskyV22Pipeline"), Some("kandinsky22"));
    // Listed under the same key in two tables.
    assert_eq!(model_name("FluxKontextPipeline"), Some("flux-kontext"));
    assert_eq!(model_name("AnyFlowFARPipeline"), Some("anyflow-far"));
    assert_eq!(model_name("KolorsImg2ImgPipeline"), Some("kolors"));
    assert_eq!(model_name("StableDiffusionUpscalePipeline"), None);
}

#[test]
fn connected_slot_names_split_like_diffusers() {
    let slot = |name| ComponentSlot {
        name,
        class: "X",
        optional: false,
    };
    assert_eq!(slot("prior_prior").connected(), Some(("prior", "prior")));
    assert_eq!(
        slot("prior_text_encoder").connected(),
        Some(("prior", "text_encoder"))
    );
    assert_eq!(slot("prior").connected(), None);
    assert_eq!(slot("text_encoder").connected(), None);
}
