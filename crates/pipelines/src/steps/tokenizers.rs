//! Tokenizers, loaded once per folder and shared: they are immutable after loading, and reading a
//! 49408-token vocabulary per request would cost more than a denoising step of a small model.

use crate::{PipelineError, Result};
use autopipe_repo::Checkpoint;
use autopipe_tokenizer::{ClipTokenizer, PretrainedTokenizer, T5Tokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Tokenizers by folder.
#[derive(Default)]
pub struct TokenizerCache {
    clip: Mutex<HashMap<PathBuf, Arc<ClipTokenizer>>>,
    pretrained: Mutex<HashMap<PathBuf, Arc<PretrainedTokenizer>>>,
    t5: Mutex<HashMap<PathBuf, Arc<T5Tokenizer>>>,
}

/// The length DeepFloyd IF pads and truncates T5 prompts to (`encode_prompt`'s `max_length = 77`).
pub const T5_MAX_LENGTH: usize = 77;

impl TokenizerCache {
    /// The CLIP tokenizer in `checkpoint`'s `component` folder (`tokenizer`, `tokenizer_2`).
    pub fn clip(&self, checkpoint: &Checkpoint, component: &str) -> Result<Arc<ClipTokenizer>> {
        cached(
            &self.clip,
            checkpoint,
            component,
            ClipTokenizer::from_folder,
        )
    }

    /// The tokenizers-backed tokenizer (XLM-RoBERTa, …) in `checkpoint`'s `component` folder: the
    /// class its tokenizer_config.json names, else the one model_index.json declares.
    pub fn pretrained(
        &self,
        checkpoint: &Checkpoint,
        component: &str,
    ) -> Result<Arc<PretrainedTokenizer>> {
        let declared = checkpoint.component_class(component);
        cached(&self.pretrained, checkpoint, component, |dir| {
            PretrainedTokenizer::from_folder_declared(dir, declared)
        })
    }

    /// The T5 tokenizer in `checkpoint`'s `component` folder, padding and truncating to
    /// [`T5_MAX_LENGTH`] tokens as DeepFloyd IF calls it.
    pub fn t5(&self, checkpoint: &Checkpoint, component: &str) -> Result<Arc<T5Tokenizer>> {
        cached(&self.t5, checkpoint, component, |dir| {
            T5Tokenizer::from_folder(dir, T5_MAX_LENGTH)
        })
    }
}

/// The tokenizer of `component`'s folder from `cache`, loaded by `load` on first use.
fn cached<T>(
    cache: &Mutex<HashMap<PathBuf, Arc<T>>>,
    checkpoint: &Checkpoint,
    component: &str,
    load: impl FnOnce(&Path) -> autopipe_tokenizer::Result<T>,
) -> Result<Arc<T>> {
    let lock = || cache.lock().unwrap_or_else(|p| p.into_inner());
    let dir = checkpoint.component_dir(component)?;
    if let Some(t) = lock().get(&dir) {
        return Ok(t.clone());
    }
    let t = Arc::new(load(&dir).map_err(|e| {
        PipelineError::Checkpoint(autopipe_repo::Error::Malformed {
            path: dir.clone(),
            reason: format!("{component}: {e}"),
        })
    })?);
    lock().insert(dir, t.clone());
    Ok(t)
}
