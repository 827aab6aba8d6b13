//! Tokenizers, loaded once per folder and shared: they are immutable after loading, and reading a
//! 49408-token vocabulary per request would cost more than a denoising step of a small model.

use crate::{PipelineError, Result};
use autopipe_repo::Checkpoint;
use autopipe_tokenizer::ClipTokenizer;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Tokenizers by folder.
#[derive(Default)]
pub struct TokenizerCache {
    clip: Mutex<HashMap<PathBuf, Arc<ClipTokenizer>>>,
}

impl TokenizerCache {
    /// The CLIP tokenizer in `checkpoint`'s `component` folder (`tokenizer`, `tokenizer_2`).
    pub fn clip(&self, checkpoint: &Checkpoint, component: &str) -> Result<Arc<ClipTokenizer>> {
        let dir = checkpoint.component_dir(component)?;
        if let Some(t) = self.lock().get(&dir) {
            return Ok(t.clone());
        }
        let t = Arc::new(ClipTokenizer::from_folder(&dir).map_err(|e| {
            PipelineError::Checkpoint(autopipe_repo::Error::Malformed {
                path: dir.clone(),
                reason: format!("{component}: {e}"),
            })
        })?);
        self.lock().insert(dir, t.clone());
        Ok(t)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Arc<ClipTokenizer>>> {
        self.clip.lock().unwrap_or_else(|p| p.into_inner())
    }
}
