//! CLIPImageProcessor parity: tests/fixtures/reference/clip_image_processor (made by
//! scripts/fixtures/safety.py with transformers 5.24's CLIPImageProcessor, PIL backend) holds
//! images of several sizes, aspect ratios and modes, two preprocessor configs and transformers'
//! `pixel_values` for each pair; autopipe's processor must give the same values.

use autopipe_pipelines::steps::clip_image_processor::CLIPImageProcessor;
use std::path::PathBuf;
use tch::Tensor;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/reference/clip_image_processor")
}

#[test]
fn matches_transformers_on_every_size_and_mode() {
    let references = Tensor::read_safetensors(dir().join("pixel_values.safetensors")).unwrap();
    assert!(references.len() >= 8, "{} references", references.len());
    // One uint8 step after normalisation, for the smallest std: 1 / 255 / 0.2613.
    let one_step = 1.0 / 255.0 / 0.26130258;
    let mut worst = 0f64;
    for (name, expected) in &references {
        let (config, image) = name.split_once('/').unwrap();
        let json =
            std::fs::read_to_string(dir().join(format!("{config}_preprocessor_config.json")))
                .unwrap();
        let processor =
            CLIPImageProcessor::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
        let img = image::open(dir().join("inputs").join(image))
            .unwrap()
            .to_rgb8();
        let got = processor.preprocess(&[img]).unwrap();
        assert_eq!(got.size()[1..], expected.size()[..], "{name}: shape");
        let diff = (got.get(0) - expected).abs().max().double_value(&[]);
        println!("{name:<28} {:?} max |Δ| {diff:.3e}", expected.size());
        worst = worst.max(diff);
    }
    println!(
        "worst max |Δ| {worst:.3e} ({:.3} uint8 steps)",
        worst / one_step
    );
    assert!(
        worst <= 1e-6,
        "max |Δ| {worst} (a uint8 step is {one_step})"
    );
}
