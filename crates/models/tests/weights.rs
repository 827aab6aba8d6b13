//! Weight file discovery (diffusers naming, variants, shards) and strict, converting loading.

use std::fs;
use std::path::{Path, PathBuf};

use autopipe_models::{weights, Error};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("autopipe-models-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        Self(dir)
    }

    fn touch(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, b"").expect("write");
        p
    }

    fn write_index(&self, name: &str, shards: &[&str]) {
        let map: serde_json::Map<String, serde_json::Value> = shards
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("w{i}"), serde_json::Value::from(*s)))
            .collect();
        let json = serde_json::json!({"metadata": {}, "weight_map": map});
        fs::write(self.0.join(name), json.to_string()).expect("write index");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn plain_files_of_diffusers_and_transformers() {
    let d = TempDir::new("plain");
    d.touch("model.safetensors");
    assert_eq!(
        names(&weights::weight_files(&d.0, None).unwrap()),
        ["model.safetensors"]
    );
    d.touch("diffusion_pytorch_model.safetensors");
    assert_eq!(
        names(&weights::weight_files(&d.0, None).unwrap()),
        ["diffusion_pytorch_model.safetensors"]
    );
}

#[test]
fn variant_is_preferred_and_falls_back_to_plain() {
    let d = TempDir::new("variant");
    d.touch("diffusion_pytorch_model.safetensors");
    assert_eq!(
        names(&weights::weight_files(&d.0, Some("fp16")).unwrap()),
        ["diffusion_pytorch_model.safetensors"]
    );
    d.touch("diffusion_pytorch_model.fp16.safetensors");
    assert_eq!(
        names(&weights::weight_files(&d.0, Some("fp16")).unwrap()),
        ["diffusion_pytorch_model.fp16.safetensors"]
    );
    assert_eq!(
        names(&weights::weight_files(&d.0, None).unwrap()),
        ["diffusion_pytorch_model.safetensors"]
    );
}

#[test]
fn sharded_indexes_plain_and_variant() {
    let d = TempDir::new("sharded");
    d.touch("model-00002-of-00002.safetensors");
    d.touch("model-00001-of-00002.safetensors");
    d.write_index(
        "model.safetensors.index.json",
        &[
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ],
    );
    assert_eq!(
        names(&weights::weight_files(&d.0, None).unwrap()),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    d.touch("model.fp16-00001-of-00001.safetensors");
    d.write_index(
        "model.safetensors.index.fp16.json",
        &["model.fp16-00001-of-00001.safetensors"],
    );
    assert_eq!(
        names(&weights::weight_files(&d.0, Some("fp16")).unwrap()),
        ["model.fp16-00001-of-00001.safetensors"]
    );
}

#[test]
fn sharded_index_with_missing_or_escaping_shard_is_an_error() {
    let d = TempDir::new("badshard");
    d.write_index(
        "diffusion_pytorch_model.safetensors.index.json",
        &["diffusion_pytorch_model-00001-of-00002.safetensors"],
    );
    let err = weights::weight_files(&d.0, None).expect_err("missing shard");
    println!("{err}");
    assert!(err.to_string().contains("00001-of-00002"));
    d.write_index(
        "diffusion_pytorch_model.safetensors.index.json",
        &["../x.safetensors"],
    );
    assert!(matches!(
        weights::weight_files(&d.0, None),
        Err(Error::Weights(_))
    ));
}

#[test]
fn bin_only_folder_is_an_error_naming_it() {
    let d = TempDir::new("binonly");
    d.touch("diffusion_pytorch_model.bin");
    let err = weights::weight_files(&d.0, None).expect_err("bin only");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        msg.contains("diffusion_pytorch_model.bin") && msg.contains("binonly"),
        "{msg}"
    );
    let empty = TempDir::new("empty");
    assert!(matches!(
        weights::weight_files(&empty.0, None),
        Err(Error::Weights(_))
    ));
    assert!(matches!(
        weights::weight_files(&empty.0.join("nope"), None),
        Err(Error::Weights(_))
    ));
}

fn store_with(kind: Kind, vars: &[(&str, &[i64])]) -> VarStore {
    let vs = weights::var_store(kind, Device::Cpu);
    for (name, shape) in vars {
        let _ = vs.root().zeros(name, shape);
    }
    vs
}

fn var(vs: &VarStore, name: &str) -> Tensor {
    vs.variables().remove(name).expect("var")
}

#[test]
fn load_converts_dtypes_into_the_vars_kind() {
    let d = TempDir::new("convert");
    let a = Tensor::from_slice(&[1.5f32, -2.25, 3.0, 0.125]).view([2, 2]);
    let b = Tensor::from_slice(&[0.5f32, 7.0]);
    let file = d.0.join("model.safetensors");
    Tensor::write_safetensors(
        &[
            ("a", a.to_kind(Kind::Half)),
            ("b", b.to_kind(Kind::BFloat16)),
        ],
        &file,
    )
    .unwrap();
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16, Kind::Double] {
        let mut vs = store_with(kind, &[("a", &[2, 2]), ("b", &[2])]);
        weights::load(&mut vs, std::slice::from_ref(&file), &|k: &str| {
            k.to_string()
        })
        .expect("load");
        assert_eq!(var(&vs, "a").kind(), kind);
        let da = (var(&vs, "a").to_kind(Kind::Float) - &a)
            .abs()
            .max()
            .double_value(&[]);
        let db = (var(&vs, "b").to_kind(Kind::Float) - &b)
            .abs()
            .max()
            .double_value(&[]);
        println!("{kind:?}: diff a {da:e}, b {db:e}");
        assert_eq!((da, db), (0.0, 0.0));
    }
}

#[test]
fn load_is_strict_about_names_and_shapes() {
    let d = TempDir::new("strict");
    let file = d.0.join("model.safetensors");
    Tensor::write_safetensors(
        &[
            ("a", Tensor::ones([2, 3], (Kind::Float, Device::Cpu))),
            ("extra", Tensor::ones([1], (Kind::Float, Device::Cpu))),
        ],
        &file,
    )
    .unwrap();
    let mut vs = store_with(Kind::Float, &[("a", &[3, 2]), ("missing", &[4])]);
    let err = weights::load(&mut vs, std::slice::from_ref(&file), &|k: &str| {
        k.to_string()
    })
    .expect_err("strict");
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("missing keys: missing"), "{msg}");
    assert!(msg.contains("unexpected keys: extra"), "{msg}");
    assert!(
        msg.contains("shape mismatches: a (file [2, 3], model [3, 2])"),
        "{msg}"
    );

    // Renaming to "" skips a tensor; renaming maps it onto the var.
    let mut vs = store_with(Kind::Float, &[("b", &[2, 3])]);
    let rename = |k: &str| match k {
        "a" => "b".to_string(),
        _ => String::new(),
    };
    weights::load(&mut vs, std::slice::from_ref(&file), &rename).expect("renamed");
    assert_eq!(var(&vs, "b").sum(Kind::Float).double_value(&[]), 6.0);
}

/// Writes a safetensors file by hand whose data starts at an offset that is not 4-aligned.
fn write_misaligned(path: &Path, values: &[f32]) {
    let mut header = format!(
        r#"{{"x":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        values.len(),
        values.len() * 4
    );
    while (8 + header.len()) % 4 != 2 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    fs::write(path, bytes).expect("write");
}

#[test]
fn load_handles_misaligned_tensor_data() {
    let d = TempDir::new("misaligned");
    let file = d.0.join("model.safetensors");
    write_misaligned(&file, &[1.0, 2.0, -3.5]);
    let mut vs = store_with(Kind::Float, &[("x", &[3])]);
    weights::load(&mut vs, std::slice::from_ref(&file), &|k: &str| {
        k.to_string()
    })
    .expect("load");
    let got: Vec<f32> = Vec::try_from(var(&vs, "x")).expect("vec");
    assert_eq!(got, [1.0, 2.0, -3.5]);
}

#[test]
fn load_reports_a_corrupt_file() {
    let d = TempDir::new("corrupt");
    let file = d.0.join("model.safetensors");
    fs::write(&file, b"not a safetensors file").unwrap();
    let mut vs = store_with(Kind::Float, &[("x", &[3])]);
    let err = weights::load(&mut vs, std::slice::from_ref(&file), &|k: &str| {
        k.to_string()
    })
    .expect_err("corrupt");
    println!("{err}");
    assert!(matches!(err, Error::Weights(_)));
}
