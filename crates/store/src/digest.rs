//! Which component a requested folder holds, cheaply. A component is keyed by its files' identity
//! (device, inode, size and times: a few `stat`s), not by hashing its bytes, which took 0.9 s of
//! every SD 1.5 cold start. Bytes are hashed (BLAKE3) only when the store already holds another
//! component that could be the same, one with the same fingerprint (class, config and weight-file
//! sizes), so identical components shipped in different checkpoints are still loaded once.

use crate::{Code, StoreError};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What a component folder holds, as far as metadata tells.
#[derive(Debug, Clone)]
pub struct Source {
    /// Class name, `config.json` and weight-file sizes: components with different fingerprints
    /// cannot be the same component.
    pub fingerprint: blake3::Hash,
    /// The fingerprint and each weight file's identity: the key of a component loaded from these
    /// files as they are now.
    pub identity: String,
    /// Each weight file and the version seen, to tell later whether it still holds what was loaded.
    files: Vec<(PathBuf, Version)>,
}

/// A file's identity and version: hard links and symlinks to one file (a hub cache's snapshots
/// point into its blobs) share it; rewriting the file changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(path: &Path) -> Result<Self, StoreError> {
        let m = std::fs::metadata(path).map_err(|e| not_found(path, e))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        for v in [self.dev, self.ino, self.len] {
            h.update(&v.to_le_bytes());
        }
        for v in [self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1] {
            h.update(&v.to_le_bytes());
        }
    }
}

fn not_found(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::new(Code::NotFound, format!("{}: {e}", path.display()))
}

/// Content hashes of weight files, each computed once per file version.
#[derive(Default)]
pub struct DigestCache {
    files: Mutex<HashMap<PathBuf, (Version, blake3::Hash)>>,
    hashed: AtomicU64,
}

impl DigestCache {
    /// The source of a component: its class name, `config.json` (when there is one) and weight
    /// files, in order. Reads the config and the files' metadata, not their bytes.
    pub fn source(
        &self,
        class_name: &str,
        dir: &Path,
        weight_files: &[PathBuf],
    ) -> Result<Source, StoreError> {
        let mut fp = blake3::Hasher::new();
        fp.update(&(class_name.len() as u64).to_le_bytes());
        fp.update(class_name.as_bytes());
        let config = dir.join("config.json");
        match std::fs::read(&config) {
            Ok(bytes) => {
                fp.update(&(bytes.len() as u64).to_le_bytes());
                fp.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fp.update(&u64::MAX.to_le_bytes());
            }
            Err(e) => return Err(not_found(&config, e)),
        }
        let files = weight_files
            .iter()
            .map(|f| Ok((f.clone(), Version::of(f)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        for (_, v) in &files {
            fp.update(&v.len.to_le_bytes());
        }
        let fingerprint = fp.finalize();
        let mut id = blake3::Hasher::new();
        id.update(fingerprint.as_bytes());
        for (_, v) in &files {
            v.hash_into(&mut id);
        }
        Ok(Source {
            fingerprint,
            identity: id.finalize().to_hex()[..32].to_string(),
            files,
        })
    }

    /// BLAKE3 over the bytes of `source`'s weight files, in order; `None` when a file is no longer
    /// the version `source` saw (its bytes may not be what was loaded from it).
    pub fn content(&self, source: &Source) -> Result<Option<blake3::Hash>, StoreError> {
        let mut h = blake3::Hasher::new();
        for (path, seen) in &source.files {
            if Version::of(path).ok() != Some(*seen) {
                return Ok(None);
            }
            h.update(self.file(path, *seen)?.as_bytes());
        }
        Ok(Some(h.finalize()))
    }

    /// Weight files hashed so far.
    #[cfg(test)]
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    fn file(&self, path: &Path, version: Version) -> Result<blake3::Hash, StoreError> {
        if let Some((v, hash)) = self.files.lock().expect("digest cache poisoned").get(path) {
            if *v == version {
                return Ok(*hash);
            }
        }
        // Read through one buffer rather than mapped: a mapped file's pages count in this
        // process's RSS until unmapped, which made hashing a 3.4 GB UNet the store's memory peak.
        let mut h = blake3::Hasher::new();
        let mut file = std::fs::File::open(path).map_err(|e| not_found(path, e))?;
        let mut buf = vec![0u8; HASH_CHUNK];
        loop {
            let n = read_full(&mut file, &mut buf).map_err(|e| not_found(path, e))?;
            if n == 0 {
                break;
            }
            h.update_rayon(&buf[..n]);
        }
        let hash = h.finalize();
        self.hashed.fetch_add(1, Ordering::Relaxed);
        self.files
            .lock()
            .expect("digest cache poisoned")
            .insert(path.to_path_buf(), (version, hash));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TempDir;

    fn folder(weights: &[u8]) -> (TempDir, Vec<PathBuf>) {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("config.json"), b"{\"a\": 1}").unwrap();
        let w = dir.path().join("model.safetensors");
        std::fs::write(&w, weights).unwrap();
        (dir, vec![w])
    }

    #[test]
    fn identity_follows_the_files_and_content_the_bytes() {
        let cache = DigestCache::default();
        let (a, fa) = folder(b"same bytes");
        let (b, fb) = folder(b"same bytes");
        let (c, fc) = folder(b"other byte");
        let sa = cache.source("AutoencoderKL", a.path(), &fa).unwrap();
        let sb = cache.source("AutoencoderKL", b.path(), &fb).unwrap();
        let sc = cache.source("AutoencoderKL", c.path(), &fc).unwrap();
        // Copies are other files but could be the same component; so is one of other bytes and
        // the same size, until hashed.
        assert_ne!(sa.identity, sb.identity);
        assert_eq!(sa.fingerprint, sb.fingerprint);
        assert_eq!(sa.fingerprint, sc.fingerprint);
        assert_ne!(
            sa.fingerprint,
            cache
                .source("ClipTextModel", a.path(), &fa)
                .unwrap()
                .fingerprint
        );
        let content = |s: &Source| cache.content(s).unwrap().unwrap();
        assert_eq!(content(&sa), content(&sb));
        assert_ne!(content(&sa), content(&sc));
        // A symlink to a file is that file.
        let d = TempDir::new();
        std::fs::copy(a.path().join("config.json"), d.path().join("config.json")).unwrap();
        let link = d.path().join("model.safetensors");
        std::os::unix::fs::symlink(&fa[0], &link).unwrap();
        let sd = cache.source("AutoencoderKL", d.path(), &[link]).unwrap();
        assert_eq!(sd.identity, sa.identity);
        // Rewritten in place: the old source no longer describes the file.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&fa[0], b"new  bytes").unwrap();
        assert!(cache.content(&sa).unwrap().is_none());
        let again = cache.source("AutoencoderKL", a.path(), &fa).unwrap();
        assert_ne!(again.identity, sa.identity);
        assert_ne!(content(&again), content(&sb));
    }
}
