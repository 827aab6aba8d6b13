//! Files a daemon keeps reading while it runs (token lists, certificates): their contents are
//! loaded again whenever one of the files changes, checked cheaply (`stat`) on every use, so a
//! rotated Kubernetes Secret takes effect on the next call or connection without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What identifies a version of a file without reading it: a change to any of these reloads.
/// (A Secret volume swaps a `..data` symlink: the inode changes even when size and mtime agree.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed_ns: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode: m.ino(),
        changed_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    })
}

/// What a reload that fails (a file gone, unreadable or invalid) leaves in place.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnFailure<T> {
    /// This value (fail closed: a deleted token list admits nobody).
    Use(fn() -> T),
    /// The last contents that loaded (a certificate caught half-written keeps being served).
    KeepLast,
}

type Load<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, String> + Send + Sync>;

/// The contents of a set of files, loaded again whenever one of them changes.
pub(crate) struct Watched<T> {
    paths: Vec<PathBuf>,
    load: Load<T>,
    on_failure: OnFailure<T>,
    state: Mutex<(Vec<Option<Stamp>>, Arc<T>)>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Watched<T> {
    /// Loads `paths` now; an error here is the caller's (a daemon refuses to start on it).
    pub(crate) fn open(
        paths: Vec<PathBuf>,
        load: impl Fn(&[PathBuf]) -> Result<T, String> + Send + Sync + 'static,
        on_failure: OnFailure<T>,
    ) -> Result<Self, String> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = load(&paths)?;
        Ok(Self {
            paths,
            load: Box::new(load),
            on_failure,
            state: Mutex::new((stamps, Arc::new(value))),
        })
    }

    /// The current contents, reloaded first if any file changed since the last load.
    pub(crate) fn get(&self) -> Arc<T> {
        let now: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 != now {
            let files = || {
                self.paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match (self.load)(&self.paths) {
                Ok(value) => {
                    tracing::info!(files = %files(), "reloaded");
                    state.1 = Arc::new(value);
                }
                Err(e) => match self.on_failure {
                    OnFailure::Use(fallback) => {
                        tracing::warn!(files = %files(), error = %e, "cannot load; failing closed");
                        state.1 = Arc::new(fallback());
                    }
                    OnFailure::KeepLast => {
                        tracing::warn!(files = %files(), error = %e, "cannot reload; keeping the last good version");
                    }
                },
            }
            state.0 = now;
        }
        state.1.clone()
    }
}

/// Reads one file as text (the common `load` of single-file watches).
pub(crate) fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
