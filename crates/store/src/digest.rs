//! Content identity of a component folder: BLAKE3 over its class, config and weight bytes, so that
//! identical components shipped in different checkpoints are loaded once.

use crate::{Code, StoreError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Remembers digests by (file, size, mtime) so a file is hashed once per change.
#[derive(Default)]
pub struct DigestCache {
    files: Mutex<HashMap<PathBuf, (u64, SystemTime, blake3::Hash)>>,
}

impl DigestCache {
    /// The digest of a component: its class name, `config.json` and weight files, in order.
    pub fn component(
        &self,
        class_name: &str,
        dir: &Path,
        weight_files: &[PathBuf],
    ) -> Result<String, StoreError> {
        let mut h = blake3::Hasher::new();
        h.update(class_name.as_bytes());
        let config = dir.join("config.json");
        for file in std::iter::once(&config).chain(weight_files) {
            if file == &config && !config.exists() {
                continue;
            }
            h.update(self.file(file)?.as_bytes());
        }
        Ok(h.finalize().to_hex()[..32].to_string())
    }

    fn file(&self, path: &Path) -> Result<blake3::Hash, StoreError> {
        let io =
            |e: std::io::Error| StoreError::new(Code::NotFound, format!("{}: {e}", path.display()));
        let meta = std::fs::metadata(path).map_err(io)?;
        let (len, mtime) = (meta.len(), meta.modified().map_err(io)?);
        if let Some((l, m, hash)) = self.files.lock().expect("digest cache poisoned").get(path) {
            if *l == len && *m == mtime {
                return Ok(*hash);
            }
        }
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(path).map_err(io)?;
        let hash = h.finalize();
        self.files
            .lock()
            .expect("digest cache poisoned")
            .insert(path.to_path_buf(), (len, mtime, hash));
        Ok(hash)
    }
}
