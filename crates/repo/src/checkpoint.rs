//! A diffusers checkpoint folder: `model_index.json` and one sub-folder per component.

use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `model_index.json` entry: `"unet": ["diffusers", "UNet2DConditionModel"]`, or `[null, null]`
/// for a component saved as `None` (e.g. a removed safety checker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentEntry {
    Present { library: String, class_name: String },
    Absent,
}

/// The parsed `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// The pipeline class the checkpoint was saved from, e.g. `StableDiffusionPipeline`.
    pub class_name: String,
    /// `_diffusers_version`, when present.
    pub diffusers_version: Option<String>,
    /// Component name → entry, for every non-underscore key that is a `[library, class]` pair.
    pub components: BTreeMap<String, ComponentEntry>,
    /// Every other plain key (e.g. `requires_safety_checker`, `force_zeros_for_empty_prompt`).
    pub options: BTreeMap<String, Value>,
}

impl ModelIndex {
    /// Parses `model_index.json` text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let value = autopipe_json::parse(text).map_err(|e| malformed(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| malformed("not a JSON object".into()))?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| malformed("missing \"_class_name\"".into()))?
            .to_string();
        let diffusers_version = obj
            .get("_diffusers_version")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut components = BTreeMap::new();
        let mut options = BTreeMap::new();
        for (key, v) in obj {
            if key.starts_with('_') {
                continue;
            }
            match v.as_array().map(Vec::as_slice) {
                Some([Value::String(lib), Value::String(class)]) => {
                    components.insert(
                        key.clone(),
                        ComponentEntry::Present {
                            library: lib.clone(),
                            class_name: class.clone(),
                        },
                    );
                }
                Some([Value::Null, Value::Null]) => {
                    components.insert(key.clone(), ComponentEntry::Absent);
                }
                Some(_) => {
                    return Err(malformed(format!(
                        "component {key:?} must be [library, class] or [null, null], got {v}"
                    )))
                }
                None => {
                    options.insert(key.clone(), v.clone());
                }
            }
        }
        Ok(Self {
            class_name,
            diffusers_version,
            components,
            options,
        })
    }

    /// The class name of a present component.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        match self.components.get(name) {
            Some(ComponentEntry::Present { class_name, .. }) => Some(class_name),
            _ => None,
        }
    }
}

/// A diffusers checkpoint folder on the local filesystem, with the connected pipelines loaded
/// beside it (a Kandinsky decoder's prior: diffusers' `load_connected_pipeline`).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    root: PathBuf,
    index: ModelIndex,
    /// `(prefix, checkpoint)` of each connected pipeline.
    connected: Vec<(String, Checkpoint)>,
    /// Component `<prefix>_<name>` → (index into `connected`, `<name>`).
    connected_components: BTreeMap<String, (usize, String)>,
}

impl Checkpoint {
    /// Opens a local checkpoint folder, reading its `model_index.json`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        if !root.is_dir() {
            return Err(Error::NotFound(format!(
                "model folder {} does not exist",
                root.display()
            )));
        }
        let path = root.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "{} is not a diffusers folder: no model_index.json",
                root.display()
            )),
            _ => Error::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        let index = ModelIndex::parse(&text, &path)?;
        let root = root.canonicalize().map_err(|e| Error::Io {
            path: root.clone(),
            source: e,
        })?;
        Ok(Self {
            root,
            index,
            connected: Vec::new(),
            connected_components: BTreeMap::new(),
        })
    }

    /// Adds `other`'s components as `<prefix>_<name>` (diffusers' `load_connected_pipeline`:
    /// `init_kwargs["prior_text_encoder"] = prior_pipe.text_encoder`, …). Components this
    /// checkpoint already lists keep their own entry.
    pub fn connect(&mut self, prefix: &str, other: Checkpoint) {
        let at = self.connected.len();
        for (name, entry) in &other.index.components {
            let key = format!("{prefix}_{name}");
            if let std::collections::btree_map::Entry::Vacant(v) =
                self.index.components.entry(key.clone())
            {
                v.insert(entry.clone());
                self.connected_components.insert(key, (at, name.clone()));
            }
        }
        self.connected.push((prefix.to_string(), other));
    }

    /// The checkpoint connected under `prefix`, if any.
    pub fn connected(&self, prefix: &str) -> Option<&Checkpoint> {
        self.connected
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, c)| c)
    }

    /// The list under `key` in the model card's (`README.md`) YAML front matter, as diffusers
    /// reads connected pipelines from it (`ModelCard.load(...).data.prior`); `None` without a
    /// card, front matter or key.
    pub fn model_card_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        let path = self.root.join("README.md");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        front_matter_list(&text, key).map_err(|reason| Error::Malformed { path, reason })
    }

    /// The checkpoint folder (canonical path).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The parsed `model_index.json`.
    pub fn index(&self) -> &ModelIndex {
        &self.index
    }

    /// The class `model_index.json` declares for a component (or a connected checkpoint's does).
    pub fn component_class(&self, name: &str) -> Option<&str> {
        match self.connected_components.get(name) {
            Some((at, inner)) => self.connected[*at].1.component_class(inner),
            None => self.index.component_class(name),
        }
    }

    /// The folder of a component listed in `model_index.json` (or of a connected checkpoint).
    pub fn component_dir(&self, name: &str) -> Result<PathBuf> {
        if let Some((at, inner)) = self.connected_components.get(name) {
            return self.connected[*at].1.component_dir(inner);
        }
        if self.index.component_class(name).is_none() {
            return Err(Error::NotFound(format!(
                "component {name:?} is not in {}/model_index.json",
                self.root.display()
            )));
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::NotFound(format!(
                "component folder {} does not exist",
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// Reads a JSON file of a component folder, e.g. `("scheduler", "scheduler_config.json")`, as
    /// Python's `json` wrote it: non-finite numbers are `autopipe_json` markers.
    pub fn read_json(&self, component: &str, file: &str) -> Result<Value> {
        let path = self.component_dir(component)?.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("{} does not exist", path.display()))
            }
            _ => Error::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        autopipe_json::parse(&text).map_err(|e| Error::Malformed {
            path,
            reason: e.to_string(),
        })
    }
}

/// The YAML front matter's list under `key` (`key: [a, b]`, or `key:` followed by `- a` lines).
fn front_matter_list(text: &str, key: &str) -> std::result::Result<Option<Vec<String>>, String> {
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return Ok(None);
    }
    let body: Vec<&str> = lines.take_while(|l| l.trim_end() != "---").collect();
    let unquote = |v: &str| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
    let Some(at) = body.iter().position(|l| {
        l.strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with(':'))
    }) else {
        return Ok(None);
    };
    let rest = body[at][key.len()..].trim_start()[1..].trim();
    if let Some(inline) = rest.strip_prefix('[') {
        let inner = inline
            .strip_suffix(']')
            .ok_or_else(|| format!("front matter {key:?}: unterminated list"))?;
        return Ok(Some(
            inner
                .split(',')
                .map(unquote)
                .filter(|v| !v.is_empty())
                .collect(),
        ));
    }
    if !rest.is_empty() {
        return Err(format!(
            "front matter {key:?}: expected a list, got {rest:?}"
        ));
    }
    let items = body[at + 1..]
        .iter()
        .take_while(|l| l.trim_start().starts_with("- ") || l.trim().is_empty())
        .filter_map(|l| l.trim_start().strip_prefix("- ").map(unquote))
        .collect();
    Ok(Some(items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_components_nulls_and_options() {
        let text = r#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null],
            "requires_safety_checker": false}"#;
        let idx = ModelIndex::parse(text, Path::new("model_index.json")).unwrap();
        assert_eq!(idx.class_name, "StableDiffusionPipeline");
        assert_eq!(idx.component_class("unet"), Some("UNet2DConditionModel"));
        assert_eq!(
            idx.components.get("safety_checker"),
            Some(&ComponentEntry::Absent)
        );
        assert_eq!(idx.component_class("safety_checker"), None);
        assert_eq!(
            idx.options.get("requires_safety_checker"),
            Some(&Value::Bool(false))
        );
    }

    #[test]
    fn rejects_what_diffusers_does_not_write() {
        for bad in [
            r#"[]"#,
            r#"{"unet": ["diffusers", "UNet2DConditionModel"]}"#,
            r#"{"_class_name": "X", "unet": ["diffusers"]}"#,
            "{",
        ] {
            let err = ModelIndex::parse(bad, Path::new("m.json")).unwrap_err();
            assert!(matches!(err, Error::Malformed { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn front_matter_lists_parse_both_styles() {
        let block = "---\nlicense: apache-2.0\nprior:\n- kandinsky-community/kandinsky-2-2-prior\n- other\ntags:\n- x\n---\n# card";
        assert_eq!(
            front_matter_list(block, "prior").unwrap(),
            Some(vec![
                "kandinsky-community/kandinsky-2-2-prior".to_string(),
                "other".to_string()
            ])
        );
        let inline = "---\nprior: [\"../prior\", b]\n---\n";
        assert_eq!(
            front_matter_list(inline, "prior").unwrap(),
            Some(vec!["../prior".to_string(), "b".to_string()])
        );
        assert_eq!(
            front_matter_list("# no front matter", "prior").unwrap(),
            None
        );
        assert_eq!(
            front_matter_list("---\ntags: [a]\n---\n", "prior").unwrap(),
            None
        );
        assert!(front_matter_list("---\nprior: x\n---\n", "prior").is_err());
    }

    #[test]
    fn reads_json_as_python_writes_it() {
        let root = std::env::temp_dir().join(format!("autopipe-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(root.join("scheduler")).unwrap();
        std::fs::write(
            root.join("model_index.json"),
            r#"{"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}"#,
        )
        .unwrap();
        let config = root.join("scheduler/scheduler_config.json");
        std::fs::write(
            &config,
            "{\n  \"lambda_min_clipped\": -Infinity,\n  \"note\": \"NaN\"\n}",
        )
        .unwrap();
        let ckpt = Checkpoint::open(&root).unwrap();
        let value = ckpt
            .read_json("scheduler", "scheduler_config.json")
            .unwrap();
        let clip: f64 = autopipe_json::from_value(value["lambda_min_clipped"].clone()).unwrap();
        assert_eq!(clip, f64::NEG_INFINITY);
        assert_eq!(value["note"], "NaN");

        std::fs::write(&config, r#"{"lambda_min_clipped": -Infinit}"#).unwrap();
        let err = ckpt
            .read_json("scheduler", "scheduler_config.json")
            .unwrap_err();
        assert!(matches!(err, Error::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("scheduler_config.json"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_folder_is_not_found() {
        let err = Checkpoint::open("/nonexistent/autopipe/model").unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    }
}
