//! What a request's `model` field names: a local diffusers folder or a hub repo id.

use crate::{Error, Result};
use std::path::PathBuf;

/// A model reference, as diffusers' `from_pretrained(pretrained_model_name_or_path)` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// An existing local folder.
    Local(PathBuf),
    /// A hub repository id (`org/name` or `name`) at a revision.
    Hub { repo_id: String, revision: String },
}

impl ModelRef {
    /// Classifies `model` the way diffusers does: an existing directory wins, otherwise it must
    /// look like a hub repo id.
    pub fn parse(model: &str, revision: &str) -> Result<Self> {
        let model = model.trim();
        if model.is_empty() {
            return Err(Error::InvalidReference(model.to_string()));
        }
        let path = PathBuf::from(model);
        if path.is_dir() {
            return Ok(Self::Local(path));
        }
        if looks_like_path(model) {
            return Err(Error::NotFound(format!(
                "model folder {model} does not exist"
            )));
        }
        Self::parse_hub(model, revision)
    }

    /// `model` as a hub repo id at `revision` (default `main`), without looking at the disk.
    pub(crate) fn parse_hub(model: &str, revision: &str) -> Result<Self> {
        if !is_repo_id(model) {
            return Err(Error::InvalidReference(model.to_string()));
        }
        let revision = if revision.is_empty() {
            "main"
        } else {
            revision
        };
        Ok(Self::Hub {
            repo_id: model.to_string(),
            revision: revision.to_string(),
        })
    }
}

pub(crate) fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.matches('/').count() > 1
}

/// huggingface_hub's repo id rule: `[namespace/]name`, each part of letters, digits, `-`, `_`, `.`,
/// no leading/trailing `-`/`.`, no `--` or `..`, at most 96 characters.
pub(crate) fn is_repo_id(s: &str) -> bool {
    if s.len() > 96 || s.contains("--") || s.contains("..") {
        return false;
    }
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_references() {
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelRef::parse(dir.to_str().unwrap(), "").unwrap(),
            ModelRef::Local(dir.clone())
        );
        assert_eq!(
            ModelRef::parse("runwayml/stable-diffusion-v1-5", "").unwrap(),
            ModelRef::Hub {
                repo_id: "runwayml/stable-diffusion-v1-5".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelRef::parse("org/name", "fp16").unwrap(),
            ModelRef::Hub {
                repo_id: "org/name".into(),
                revision: "fp16".into()
            }
        );
        assert!(matches!(
            ModelRef::parse("/no/such/folder", ""),
            Err(Error::NotFound(_))
        ));
        for bad in ["", "  ", "a b/c", "org/-name", "org//name", "x--y/z"] {
            assert!(ModelRef::parse(bad, "").is_err(), "{bad:?} accepted");
        }
    }
}
