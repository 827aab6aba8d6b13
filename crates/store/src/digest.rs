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
        // Read through one buffer rather than mapped: a mapped file's pages count in this
        // process's RSS until unmapped, which made hashing a 3.4 GB UNet the store's memory peak.
        let mut h = blake3::Hasher::new();
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut buf = vec![0u8; HASH_CHUNK];
        loop {
            let n = read_full(&mut file, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update_rayon(&buf[..n]);
        }
        let hash = h.finalize();
        self.files
            .lock()
            .expect("digest cache poisoned")
            .insert(path.to_path_buf(), (len, mtime, hash));
        Ok(hash)
    }
}

/// Bytes hashed per read: large enough for rayon to spread one chunk over every core.
const HASH_CHUNK: usize = 16 << 20;

/// Fills `buf` from `file` as far as the file goes; the bytes read (0 at the end).
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
